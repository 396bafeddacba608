"""Configuration of `CPOTrainer` (Constrained Preference Optimization, arXiv:2605.20834)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._config_utils import _ReferenceMarginConfig
from .losses import DEFAULT_MAX_MARGIN, MARGIN_TYPES, check_margin_hyperparameters


@dataclass
class CPOConfig(_ReferenceMarginConfig):
    r"""
    Configuration class for [`CPOTrainer`]: Constrained Preference Optimization (Yang et al., ICML 2026,
    arXiv:2605.20834). Not TRL's `trl.experimental.cpo` (Contrastive Preference Optimization, Xu et al. 2024).

    Every [`~trl.DPOConfig`] field keeps its meaning. CPO adds a per-pair margin computed once from the frozen
    reference,

        m = gamma * (1/pi_ref(y_w|x) + 1/pi_ref(y_l|x)),   loss = -log sigmoid(beta * (delta_pi - delta_ref) - m),

    so `gamma=0` is exactly DPO. Defaults follow the released settings (beta 2.5 and gamma 0.05 on length-normalized
    log-probs); these defaults differ from `DPOConfig`'s:

    - `beta`: 2.5 instead of 0.1 (the released code's value, on averaged log-probs).
    - `precompute_ref_log_probs`: True instead of False (the margin is computed once before training; required).
    - `loss_type`: `'sigmoid'` names the CPO term; `length_normalize` decides whether TRL runs it on summed
      (`'sigmoid'`) or averaged (`'sigmoid_norm'`) log-probs, and `loss_type` is rewritten to that name.

    Parameters:
        gamma (`float`, *optional*, defaults to `0.05`):
            Strength of the preference constraint. 0 recovers DPO.
        margin_type (`str`, *optional*, defaults to `"inverse_prob"`):
            Numerics of `1/pi_ref`: `"inverse_prob"` (the paper's `exp(-logp_ref)`, computed in log space and capped
            by `max_margin`) or `"inverse_logp"` (the released code's `1/logp_ref`, negative, for parity with the
            published numbers).
        max_margin (`float`, *optional*, defaults to `10.0`):
            Cap on the margin's magnitude (logit units) that keeps it finite.
        length_normalize (`bool`, *optional*, defaults to `True`):
            Average log-probs per completion token (as the released code does) instead of summing them.
    """

    _method_name = "CPO"
    _card_fields = ("gamma", "margin_type", "max_margin")
    _card_formula = (
        "loss = -log sigmoid(beta * (delta_pi - delta_ref) - m),  m = gamma * (1/pi_ref(y_w) + 1/pi_ref(y_l))"
    )

    gamma: float = field(
        default=0.05,
        metadata={
            "help": "Strength of the CPO preference constraint (margin m = gamma * (1/pi_ref(y_w) + 1/pi_ref(y_l))). "
            "Released setting 0.05; gamma=0 is exactly DPO. Must be >= 0."
        },
    )
    margin_type: str = field(
        default="inverse_prob",
        metadata={
            "help": "Numerics of 1/pi_ref: 'inverse_prob' (paper: exp(-logp_ref), log-space, capped by max_margin) or "
            "'inverse_logp' (released code: 1/logp_ref, which is negative; for parity with published numbers).",
            "choices": list(MARGIN_TYPES),
        },
    )
    max_margin: float = field(
        default=DEFAULT_MAX_MARGIN,
        metadata={"help": "Cap on the magnitude of the CPO margin (logit units) that keeps it finite. Must be > 0."},
    )

    def _check_method_hyperparameters(self) -> None:
        check_margin_hyperparameters(gamma=self.gamma, margin_type=self.margin_type, max_margin=self.max_margin)
