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


def method_card_section(method, args, *, base_model: str | None, dataset_name: str | None, report=None) -> str:
    """Markdown section naming the method, the base model, the dataset and the hyperparameters that matter.

    `method` is the entry of `trl_cpo.methods.METHODS`: its fields and formula are what the card shows.
    """
    formula = method.formula
    settings = [
        ("beta", args.beta),
        *method.settings(args).items(),
        ("loss_type", args.loss_type),
        ("learning_rate", args.learning_rate),
    ]
    method = method.title
    rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in settings)
    report_section = (
        ""
        if report is None
        else f"""
### Reference report (train set, before the first step)

```text
{report.format_table()}
```
"""
    )
    return f"""## Method: {method} (Constrained Preference Optimization)

Trained with `trl_cpo`'s {method} trainer, from [{PAPER_TITLE}](https://arxiv.org/abs/{PAPER_ID}) (arXiv:{PAPER_ID}).

> {NAMING_NOTE}

`{formula}`

- Base model: {base_model or "unknown"}
- Dataset: {dataset_name or "not recorded"}

| hyperparameter | value |
| --- | --- |
{rows}
{report_section}"""


def insert_card_section(card_path: str, section: str) -> None:
    """Insert `section` into the model card at `card_path`, before TRL's "Framework versions" (or at the end)."""
    from ._trl_compat import CARD_INSERT_MARKER  # imported here: this module stays free of torch and TRL

    with open(card_path, encoding="utf-8") as f:
        card = f.read()
    marker = CARD_INSERT_MARKER
    card = card.replace(marker, section + "\n" + marker, 1) if marker in card else card + "\n" + section
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(card)
