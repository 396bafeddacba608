"""What the model cards of the method table's variants say (`trl_cpo.methods.VariantCard`): papers and descriptions."""

from __future__ import annotations

import textwrap

from .logps import is_length_normalized
from .model_card import PAPER_ID

HYPO_PAPER_ID = "2602.11902"
HYPO_PAPER_TITLE = "Mitigating Mismatch within Reference-based Preference Optimization"
HYPO_CITATION = textwrap.dedent("""\
    @inproceedings{yuan2026hypo,
        title         = {{Mitigating Mismatch within Reference-based Preference Optimization}},
        author        = {Yuan and others},
        year          = 2026,
        booktitle     = {International Conference on Learning Representations (ICLR)},
        eprint        = {2602.11902},
        archivePrefix = {arXiv},
    }""")


def _space(args) -> str:
    return "per-token averaged" if is_length_normalized(args.loss_type) else "summed"


def dpo_baseline_description(args) -> str:
    return (
        "DPO baseline for a comparison with CPO (Constrained Preference Optimization, "
        f"[arXiv:{PAPER_ID}](https://arxiv.org/abs/{PAPER_ID})), trained with trl-cpo's CPO trainer at "
        f"`cpo_gamma = 0`, whose loss is exactly DPO's, on {_space(args)} log-probs (loss_type {args.loss_type}), "
        "with reference log-probs precomputed once before training."
    )


def hypo_paper() -> dict[str, str]:
    return {"title": HYPO_PAPER_TITLE, "id": HYPO_PAPER_ID, "citation": HYPO_CITATION}


def hypo_description(args) -> str:
    return (
        f"HyPO ([{HYPO_PAPER_TITLE}](https://arxiv.org/abs/{HYPO_PAPER_ID}), Yuan et al., ICLR 2026), trained with "
        f"trl-cpo's E-CPOC trainer at its hard limit (`ecpoc_gamma = 0`, `ecpoc_tau = inf`, `ecpoc_alpha = 1`): DPO "
        "with the reference log-odds clipped at zero, `max(delta_ref, 0)`, as target, the default (`clip`) variant of "
        f"the released code of [arXiv:{PAPER_ID}](https://arxiv.org/abs/{PAPER_ID}); on {_space(args)} log-probs "
        f"(loss_type {args.loss_type})."
    )
