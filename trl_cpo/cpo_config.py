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

        m = cpo_gamma * (1/pi_ref(y_w|x) + 1/pi_ref(y_l|x)),   loss = -log sigmoid(beta * (delta_pi - delta_ref) - m),

    so `cpo_gamma=0` is exactly DPO. `1/pi_ref(y|x)` is evaluated on each completion's per-token (length-averaged)
    reference log-prob whatever `loss_type` is: a per-token-perplexity margin, the scale of the released code. The
    sequence-level `1/pi_ref` the paper writes is astronomically large on any realistic completion and would sit at
    `cpo_max_margin` on every pair. Defaults follow the released settings; these differ from `DPOConfig`'s:

    - `beta`: 2.5 instead of 0.1 (the released code's value, on per-token averaged log-probs).
    - `loss_type`: `['sigmoid_norm']` (per-token averaged log-probs) instead of `['sigmoid']` (summed).
    - `precompute_ref_log_probs`: None instead of False: the reference log-probs are computed once before training
      when the data allows it (map-style text data), else live at each step (`trl_cpo.reference_source`).

    Parameters:
        cpo_gamma (`float`, *optional*, defaults to `0.05`):
            Strength of the preference constraint. 0 recovers DPO.
        cpo_margin_type (`str`, *optional*, defaults to `"inverse_prob"`):
            Numerics of `1/pi_ref`: `"inverse_prob"` (the paper's `exp(-logp_ref)`, computed in log space and capped
            by `cpo_max_margin`) or `"inverse_logp"` (the released code's `1/logp_ref`, negative, for parity with the
            published numbers).
        cpo_max_margin (`float`, *optional*, defaults to `10.0`):
            Cap on the margin's magnitude (logit units) that keeps it finite.
        cpo_auto_gamma (`float` or `None`, *optional*, defaults to `None`):
            This project's extension, not the paper's: if set (e.g. `0.9`), `cpo_gamma` is chosen from the train
            set's reference log-probs at the precompute as the smallest value that gives this share of the misaligned
            pairs (`delta_ref < 0`) a non-negative target (`trl_cpo.recommend_cpo_gamma`). It is logged as
            `reference/cpo_gamma`, used for every eval set, and kept by checkpoints. Training stops before the first
            step if no `cpo_gamma` reaches the share (the error says why).
    """

    _method_name = "CPO"
    _none_allowed = ("cpo_auto_gamma",)

    cpo_gamma: float = field(
        default=0.05,
        metadata={
            "help": "Strength of the CPO preference constraint: margin m = cpo_gamma * (1/pi_ref(y_w) + 1/pi_ref(y_l)) "
            "on per-token reference probabilities. Released setting 0.05; 0 is exactly DPO. Must be >= 0."
        },
    )
    cpo_margin_type: str = field(
        default="inverse_prob",
        metadata={
            "help": "Numerics of 1/pi_ref: 'inverse_prob' (paper: exp(-logp_ref), log-space, capped by cpo_max_margin) "
            "or 'inverse_logp' (released code: 1/logp_ref, which is negative; for parity with published numbers).",
            "choices": list(MARGIN_TYPES),
        },
    )
    cpo_max_margin: float = field(
        default=DEFAULT_MAX_MARGIN,
        metadata={"help": "Cap on the magnitude of the CPO margin (logit units) that keeps it finite. Must be > 0."},
    )

    cpo_auto_gamma: float | None = field(
        default=None,
        metadata={
            "help": "If set (e.g. 0.9): choose cpo_gamma from the train set at the precompute as the smallest value "
            "that gives this share of the misaligned pairs (delta_ref < 0) a non-negative target; overrides "
            "cpo_gamma. This project's extension, not the paper's. Must be in (0, 1]."
        },
    )

    def _check_method_hyperparameters(self) -> None:
        if self.cpo_auto_gamma is not None and not (
            isinstance(self.cpo_auto_gamma, (int, float)) and 0 < self.cpo_auto_gamma <= 1
        ):
            raise ValueError(
                f"cpo_auto_gamma={self.cpo_auto_gamma!r} is invalid: it is the share of misaligned pairs to lift, in "
                "(0, 1]. Set e.g. cpo_auto_gamma=0.9, or leave it unset to use cpo_gamma as given."
            )
        if self.cpo_auto_gamma is not None and self.precompute_ref_log_probs is False:
            raise ValueError(
                f"cpo_auto_gamma={self.cpo_auto_gamma} needs the train set's reference log-probs before training, "
                "which precompute_ref_log_probs=False does not compute. Set cpo_gamma and unset cpo_auto_gamma, or "
                "leave precompute_ref_log_probs at None (the default) or True."
            )
        check_margin_hyperparameters(
            gamma=self.cpo_gamma, margin_type=self.cpo_margin_type, max_margin=self.cpo_max_margin, prefix="cpo_"
        )
