"""`ECPOCTrainer`: E-CPOC, the hard-constraint variant of Constrained Preference Optimization (arXiv:2605.20834)."""

from __future__ import annotations

import torch

from ._margin_trainer import _ReferenceMarginTrainer
from .ecpoc_config import ECPOCConfig
from .losses import ecpoc_target
from .model_card import CITATION, PAPER_ID, PAPER_TITLE


class ECPOCTrainer(_ReferenceMarginTrainer):
    r"""Trainer for E-CPOC (not related to TRL's Contrastive Preference Optimization).

    A drop-in replacement for [`~trl.DPOTrainer`] (a plain `DPOConfig` is upgraded to [`ECPOCConfig`]) whose loss is

        -log sigmoid(beta * (delta_pi - target)),   target = delta_ref + softplus(tau * (gamma - delta_ref)) / (alpha * tau),

    a target that never drops below gamma (for alpha <= 1), computed once per pair from the frozen reference. Logs
    `u_fraction`, `ref_misaligned_fraction` and `ecpoc_target` next to DPOTrainer's metrics.
    """

    config_class = ECPOCConfig
    margin_metric_name = "ecpoc_target"

    _tag_names = ["trl", "trl-cpo", "e-cpoc", "constrained-preference-optimization"]
    _name = "E-CPOC (Constrained Preference Optimization, hard constraint)"
    _paper = {"title": PAPER_TITLE, "id": PAPER_ID, "citation": CITATION}

    def reference_margin(self, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
        # The loss is DPO's with target - delta_ref added to the reference log-odds, i.e. a logit margin of
        # beta * (target - delta_ref).
        target = ecpoc_target(
            ref_chosen_logps, ref_rejected_logps, gamma=self.args.gamma, tau=self.args.tau, alpha=self.args.alpha
        )
        return self.args.beta * (target - (ref_chosen_logps.float() - ref_rejected_logps.float()))

    def margin_metric(self, margin: torch.Tensor, delta_ref: torch.Tensor) -> torch.Tensor:
        return delta_ref + margin / self.args.beta
