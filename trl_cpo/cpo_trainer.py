"""`CPOTrainer`: Constrained Preference Optimization (Yang et al., ICML 2026, arXiv:2605.20834) on TRL's DPOTrainer."""

from __future__ import annotations

import torch

from ._margin_trainer import _ReferenceMarginTrainer
from .cpo_config import CPOConfig
from .losses import cpo_margin
from .model_card import CITATION, PAPER_ID, PAPER_TITLE


class CPOTrainer(_ReferenceMarginTrainer):
    r"""Trainer for CPO, Constrained Preference Optimization (not TRL's Contrastive Preference Optimization).

    A drop-in replacement for [`~trl.DPOTrainer`] (same arguments; a plain `DPOConfig` is upgraded to [`CPOConfig`])
    whose loss is

        -log sigmoid(beta * (delta_pi - delta_ref) - m),   m = gamma * (1/pi_ref(y_w|x) + 1/pi_ref(y_l|x)),

    with `m` computed once per pair from the frozen reference before training (see `trl_cpo.losses.cpo_margin`).
    Logs `u_fraction`, `ref_misaligned_fraction` and `cpo_margin` next to DPOTrainer's metrics.
    """

    config_class = CPOConfig
    margin_metric_name = "cpo_margin"

    _tag_names = ["trl", "trl-cpo", "constrained-preference-optimization"]
    _name = "CPO (Constrained Preference Optimization)"
    _paper = {"title": PAPER_TITLE, "id": PAPER_ID, "citation": CITATION}

    def reference_margin(self, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
        return cpo_margin(
            ref_chosen_logps,
            ref_rejected_logps,
            gamma=self.args.gamma,
            margin_type=self.args.margin_type,
            max_margin=self.args.max_margin,
        )

    def margin_metric(self, margin: torch.Tensor, delta_ref: torch.Tensor) -> torch.Tensor:
        return margin
