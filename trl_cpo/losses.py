r"""CPO and E-CPOC losses as pure functions over per-pair log-probabilities.

Paper: Yang, Zhang, Xue, Fang, Han, Guo, "Conditional Equivalence of DPO and RLHF: Implicit Assumption, Failure
Modes, and Provable Alignment", ICML 2026, arXiv:2605.20834.

Every function takes 1-D tensors with one entry per preference pair: the log-probability of the chosen (preferred,
``y_w``) and rejected (``y_l``) completion under the policy and under the frozen reference. Whether those log-probs
are summed over completion tokens or averaged per token is the caller's choice; the released code averages, and its
``beta = 2.5`` assumes that scale. With

    delta_pi  = logp_pi(y_w)  - logp_pi(y_l)
    delta_ref = logp_ref(y_w) - logp_ref(y_l)

all three losses are a logistic margin ranking on ``delta_pi``; they differ only in the target it must beat, and that
target depends on the reference alone (which is why the trainers compute it once, before training).

Math runs in float32 whatever the input dtype (bf16 log-probs of long completions reach magnitudes where bf16 has no
fractional bits left); results are float32 and gradients flow back to the inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Default cap on the CPO margin (logit units). ``-logsigmoid(x - 10)`` is already within 5e-5 of the linear regime,
#: so a larger margin only rescales the loss without changing which pairs are pushed; the cap keeps the
#: ``inverse_prob`` form finite on summed log-probs, where ``1/pi_ref(y)`` is astronomically large.
DEFAULT_MAX_MARGIN = 10.0

MARGIN_TYPES = ("inverse_prob", "inverse_logp")

# `inverse_logp` divides by log-probs, which are <= 0 and can be exactly 0. Clamping them to at most -1e-6 keeps the
# division finite; the resulting (huge, negative) margin is then bounded by `max_margin` like the other form.
_MIN_ABS_LOGP = 1e-6


def check_margin_hyperparameters(
    *, gamma: float, margin_type: str | None = None, max_margin: float | None = None, prefix: str = ""
) -> None:
    """Raise a `ValueError` naming the field and the fix if a CPO margin hyperparameter is unusable.

    `prefix` is prepended to the names in the message (`"cpo_"` for `CPOConfig`'s fields).
    """
    if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(
            f"{prefix}gamma={gamma!r} is invalid: it must be a finite number >= 0 ({prefix}gamma=0 recovers plain "
            f"DPO). Set `{prefix}gamma` to a non-negative value, e.g. 0.05 (CPO) or 0.5 (E-CPOC)."
        )
    if margin_type is not None and margin_type not in MARGIN_TYPES:
        raise ValueError(
            f"{prefix}margin_type={margin_type!r} is unknown. Use one of {list(MARGIN_TYPES)}: 'inverse_prob' is the "
            "paper's 1/pi_ref form, 'inverse_logp' reproduces the released code's numerics."
        )
    if max_margin is not None and (
        not isinstance(max_margin, (int, float)) or not math.isfinite(max_margin) or max_margin <= 0
    ):
        raise ValueError(
            f"{prefix}max_margin={max_margin!r} is invalid: it must be a finite number > 0 (it bounds the CPO margin "
            f"so the loss stays finite). Set `{prefix}max_margin` to a positive value, e.g. {DEFAULT_MAX_MARGIN}."
        )


def check_target_hyperparameters(*, gamma: float, tau: float, alpha: float, prefix: str = "") -> None:
    """Raise a `ValueError` naming the field and the fix if an E-CPOC hyperparameter is unusable."""
    check_margin_hyperparameters(gamma=gamma, prefix=prefix)
    if not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
        raise ValueError(
            f"{prefix}tau={tau!r} is invalid: it must be > 0. Use a positive temperature (default 2.0), or "
            f"float('inf') for the hard target max(delta_ref, {prefix}gamma)."
        )
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"{prefix}alpha={alpha!r} is invalid: it must be a finite number > 0. Set `{prefix}alpha` to e.g. 1.0."
        )


def check_beta(beta: float) -> None:
    """Raise a `ValueError` naming the field and the fix if `beta` is unusable (the margin enters as margin/beta)."""
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(
            f"beta={beta!r} is invalid: it must be a finite number > 0. Set `beta` to a positive value, e.g. 2.5 on "
            "length-normalized log-probs."
        )


def _log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    return chosen_logps.float() - rejected_logps.float()


def margin_ranking_loss(delta_pi: torch.Tensor, target: torch.Tensor, *, beta: float) -> torch.Tensor:
    r"""Per-pair logistic margin ranking: ``-log sigmoid(beta * (delta_pi - target))``."""
    return -F.logsigmoid(beta * (delta_pi.float() - target.float()))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    r"""Per-pair DPO loss (Rafailov et al. 2023), the baseline CPO and E-CPOC modify.

    ``loss = -log sigmoid(beta * (delta_pi - delta_ref))``

    Its target is ``delta_ref``, which is negative whenever the reference prefers the rejected response: then the
    loss can fall while ``delta_pi < 0`` (the undesirable space U, arXiv:2605.20834 Def. 3.3).
    """
    check_beta(beta)
    return margin_ranking_loss(
        _log_odds(policy_chosen_logps, policy_rejected_logps),
        _log_odds(ref_chosen_logps, ref_rejected_logps),
        beta=beta,
    )


def cpo_margin(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    gamma: float,
    margin_type: str = "inverse_prob",
    max_margin: float = DEFAULT_MAX_MARGIN,
) -> torch.Tensor:
    r"""Per-pair CPO adaptive margin ``m`` (logit units), computed from the frozen reference only.

    Pass **per-token** (length-averaged) reference log-probs, whatever space the loss runs in: ``1/pi_ref(y)`` is then
    a per-token perplexity, the scale of the released code. The paper writes the sequence-level ``1/pi_ref(y|x)``;
    on summed log-probs it is astronomically large (a 200-token completion has ``logp`` near -400), so the cap binds
    on every realistic pair and ``gamma`` stops mattering. The trainers always call this with per-token log-probs.

    ``inverse_prob`` (the paper's form, arXiv:2605.20834, CPO objective with ``1/pi*`` approximated by ``1/pi_ref``):

        m = gamma * (1/pi_ref(y_w|x) + 1/pi_ref(y_l|x)),    evaluated in log space as
        log m = log gamma + logaddexp(-logp_ref(y_w), -logp_ref(y_l)),   then m = min(m, max_margin)

    ``inverse_logp`` (the released code's numerics, kept for parity with the published numbers):

        m = gamma * (1/logp_ref(y_w) + 1/logp_ref(y_l)),   clamped to [-max_margin, max_margin]

    Log-probs are <= 0, so the ``inverse_logp`` margin is negative: it lowers the target instead of raising it.
    Log-probs above ``-1e-6`` are treated as ``-1e-6`` there so the division stays finite.
    """
    check_margin_hyperparameters(gamma=gamma, margin_type=margin_type, max_margin=max_margin)
    chosen, rejected = ref_chosen_logps.float(), ref_rejected_logps.float()
    if gamma == 0:
        return torch.zeros_like(chosen)
    if margin_type == "inverse_prob":
        log_margin = math.log(gamma) + torch.logaddexp(-chosen, -rejected)
        return torch.exp(log_margin.clamp(max=math.log(max_margin)))
    inverse_sum = 1.0 / chosen.clamp(max=-_MIN_ABS_LOGP) + 1.0 / rejected.clamp(max=-_MIN_ABS_LOGP)
    return (gamma * inverse_sum).clamp(min=-max_margin, max=max_margin)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    margin_type: str = "inverse_prob",
    max_margin: float = DEFAULT_MAX_MARGIN,
    ref_chosen_token_logps: torch.Tensor | None = None,
    ref_rejected_token_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-pair CPO loss (Constrained Preference Optimization, soft constraint; arXiv:2605.20834).

    ``loss = -log sigmoid(beta * (delta_pi - delta_ref) - m)`` with ``m`` from :func:`cpo_margin`.

    ``gamma = 0`` gives ``m = 0``, i.e. exactly :func:`dpo_loss`. The log-probs are in the loss's space (summed or
    per-token); ``m`` is computed from ``ref_*_token_logps``, the per-token reference log-probs, when given (the
    trainers' choice, see :func:`cpo_margin`), and otherwise from ``ref_*_logps`` as passed.
    """
    check_beta(beta)
    margin_chosen = ref_chosen_logps if ref_chosen_token_logps is None else ref_chosen_token_logps
    margin_rejected = ref_rejected_logps if ref_rejected_token_logps is None else ref_rejected_token_logps
    margin = cpo_margin(margin_chosen, margin_rejected, gamma=gamma, margin_type=margin_type, max_margin=max_margin)
    target = _log_odds(ref_chosen_logps, ref_rejected_logps) + margin / beta
    return margin_ranking_loss(_log_odds(policy_chosen_logps, policy_rejected_logps), target, beta=beta)


def ecpoc_target(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    gamma: float,
    tau: float,
    alpha: float,
) -> torch.Tensor:
    r"""Per-pair E-CPOC target log-odds (hard constraint with a conservative bound; arXiv:2605.20834).

        target = delta_ref + (1/alpha) * softplus(tau * (gamma - delta_ref)) / tau

    A smooth ``max``: as ``tau -> inf`` with ``alpha = 1`` it tends to ``max(delta_ref, gamma)``, which is what
    ``tau = float('inf')`` computes exactly (``delta_ref + relu(gamma - delta_ref) / alpha``). With ``alpha <= 1`` the
    target is never below ``gamma``, so minimising the loss pushes ``delta_pi`` above ``gamma > 0`` even where the
    reference prefers the rejected response.
    """
    check_target_hyperparameters(gamma=gamma, tau=tau, alpha=alpha)
    delta_ref = _log_odds(ref_chosen_logps, ref_rejected_logps)
    if math.isinf(tau):
        offset = torch.relu(gamma - delta_ref)
    else:
        offset = F.softplus(tau * (gamma - delta_ref)) / tau
    return delta_ref + offset / alpha


def ecpoc_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    tau: float,
    alpha: float,
) -> torch.Tensor:
    r"""Per-pair E-CPOC loss: ``-log sigmoid(beta * (delta_pi - target))`` with ``target`` from :func:`ecpoc_target`."""
    check_beta(beta)
    target = ecpoc_target(ref_chosen_logps, ref_rejected_logps, gamma=gamma, tau=tau, alpha=alpha)
    return margin_ranking_loss(_log_odds(policy_chosen_logps, policy_rejected_logps), target, beta=beta)
