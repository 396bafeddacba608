"""Method section added to the model card that DPOTrainer writes, so the card names the method and its settings."""

from __future__ import annotations

import textwrap

PAPER_ID = "2605.20834"
PAPER_TITLE = "Conditional Equivalence of DPO and RLHF: Implicit Assumption, Failure Modes, and Provable Alignment"
CITATION = textwrap.dedent("""\
    @inproceedings{yang2026conditional,
        title     = {{Conditional Equivalence of DPO and RLHF: Implicit Assumption, Failure Modes, and Provable Alignment}},
        author    = {Yang and Zhang and Xue and Fang and Han and Guo},
        year      = 2026,
        booktitle = {Proceedings of the 43rd International Conference on Machine Learning (ICML)},
        eprint    = {2605.20834},
        archivePrefix = {arXiv},
    }""")

NAMING_NOTE = (
    "CPO here is *Constrained* Preference Optimization (arXiv:2605.20834), not TRL's Contrastive Preference "
    "Optimization (Xu et al. 2024, `trl.experimental.cpo`), which shares the acronym but is a different algorithm."
)


def method_card_section(args, *, base_model: str | None, dataset_name: str | None) -> str:
    """Markdown section naming the method, the base model, the dataset and the hyperparameters that matter."""
    method = args._method_name
    if method == "CPO":
        settings = [
            ("gamma", args.gamma),
            ("margin_type", args.margin_type),
            ("max_margin", args.max_margin),
        ]
        formula = (
            "loss = -log sigmoid(beta * (delta_pi - delta_ref) - m),  m = gamma * (1/pi_ref(y_w) + 1/pi_ref(y_l))"
        )
    else:
        settings = [("gamma", args.gamma), ("tau", args.tau), ("alpha", args.alpha)]
        formula = (
            "loss = -log sigmoid(beta * (delta_pi - target)),  "
            "target = delta_ref + softplus(tau * (gamma - delta_ref)) / (alpha * tau)"
        )
    settings = [
        ("beta", args.beta),
        *settings,
        ("length_normalize", args.length_normalize),
        ("loss_type", args.loss_type),
        ("learning_rate", args.learning_rate),
    ]
    rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in settings)
    return textwrap.dedent("""\
        ## Method: {method} (Constrained Preference Optimization)

        Trained with `trl_cpo`'s {method} trainer, from [{title}](https://arxiv.org/abs/{paper_id}) (arXiv:{paper_id}).

        > {note}

        `{formula}`

        - Base model: {base_model}
        - Dataset: {dataset}

        | hyperparameter | value |
        | --- | --- |
        {rows}

        Cite {method} as:

        ```bibtex
        {citation}
        ```
        """).format(
        method=method,
        title=PAPER_TITLE,
        paper_id=PAPER_ID,
        note=NAMING_NOTE,
        formula=formula,
        base_model=base_model or "unknown",
        dataset=dataset_name or "not recorded",
        rows=rows.replace("\n", "\n"),
        citation=CITATION,
    )
