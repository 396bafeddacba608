"""`ECPOCTrainer`: E-CPOC, the hard-constraint variant of Constrained Preference Optimization (arXiv:2605.20834)."""

from __future__ import annotations

from ._margin_trainer import _ReferenceMarginTrainer
from ._trl_compat import card_attributes
from .methods import METHODS
from .model_card import CITATION, PAPER_ID, PAPER_TITLE


class ECPOCTrainer(_ReferenceMarginTrainer):
    r"""Trainer for E-CPOC (not related to TRL's Contrastive Preference Optimization).

    A drop-in replacement for [`~trl.DPOTrainer`] (a plain `DPOConfig` is used as is, with the E-CPOC fields at their
    defaults) whose loss is

        -log sigmoid(beta * (delta_pi - target)),
        target = delta_ref + softplus(ecpoc_tau * (ecpoc_gamma - delta_ref)) / (ecpoc_alpha * ecpoc_tau),

    a target that never drops below ecpoc_gamma (for ecpoc_alpha <= 1), computed per pair from the batch's reference
    log-probs (precomputed or live). Logs
    `u_fraction`, `ref_misaligned_fraction` and `ecpoc_target` next to DPOTrainer's metrics.
    """

    method = METHODS["ecpoc"]

    _tag_names, _name, _paper = card_attributes(
        tags=["trl", "trl-cpo", "e-cpoc", "constrained-preference-optimization"],
        name="E-CPOC (Constrained Preference Optimization, hard constraint)",
        paper={"title": PAPER_TITLE, "id": PAPER_ID, "citation": CITATION},
    )
