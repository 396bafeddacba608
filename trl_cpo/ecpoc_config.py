"""Configuration of `ECPOCTrainer` (E-CPOC, arXiv:2605.20834)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._config_utils import _ReferenceMarginConfig
from .losses import check_target_hyperparameters


@dataclass
class ECPOCConfig(_ReferenceMarginConfig):
    r"""
    Configuration class for [`ECPOCTrainer`]: E-CPOC, the hard-constraint variant of Constrained Preference
    Optimization (Yang et al., ICML 2026, arXiv:2605.20834). Not related to TRL's Contrastive Preference Optimization.

    Every [`~trl.DPOConfig`] field keeps its meaning. E-CPOC replaces DPO's target `delta_ref` with one that never
    drops below `ecpoc_gamma`,

        target = delta_ref + (1/ecpoc_alpha) * softplus(ecpoc_tau * (ecpoc_gamma - delta_ref)) / ecpoc_tau,
        loss   = -log sigmoid(beta * (delta_pi - target)),

    with `delta_ref` in the log-prob space `loss_type` picks. Defaults are the released code's (gamma 0.5, tau 2.0,
    alpha 1.0) on per-token averaged log-probs (`loss_type=['sigmoid_norm']`), with the CPO beta (2.5); the paper
    reports no E-CPOC experiments. As in `CPOConfig`, `precompute_ref_log_probs` defaults to None (precompute where the data allows it, else live).

    Parameters:
        ecpoc_gamma (`float`, *optional*, defaults to `0.5`):
            Floor of the target log-odds. Must be >= 0.
        ecpoc_tau (`float`, *optional*, defaults to `2.0`):
            Sharpness of the smooth max; `float("inf")` gives the hard `max(delta_ref, ecpoc_gamma)` (with
            `ecpoc_alpha=1`).
        ecpoc_alpha (`float`, *optional*, defaults to `1.0`):
            Scale of the correction term `softplus(...)/ecpoc_tau`.
    """

    _method_name = "E-CPOC"

    ecpoc_gamma: float = field(
        default=0.5,
        metadata={"help": "Floor of the E-CPOC target log-odds (released default 0.5). Must be >= 0."},
    )
    ecpoc_tau: float = field(
        default=2.0,
        metadata={
            "help": "Sharpness of the smooth max in the E-CPOC target (released default 2.0). Must be > 0; 'inf' "
            "gives the hard max(delta_ref, ecpoc_gamma)."
        },
    )
    ecpoc_alpha: float = field(
        default=1.0,
        metadata={"help": "Scale 1/ecpoc_alpha of the E-CPOC correction term (released default 1.0). Must be > 0."},
    )

    def _check_method_hyperparameters(self) -> None:
        check_target_hyperparameters(
            gamma=self.ecpoc_gamma, tau=self.ecpoc_tau, alpha=self.ecpoc_alpha, prefix="ecpoc_"
        )
