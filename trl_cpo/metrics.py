r"""DPO diagnostics as pure functions: the undesirable solution space U (arXiv:2605.20834, Def. 3.3), ranking accuracy
(Chen et al. 2024), likelihood displacement (Razin et al. 2024) and gradient saturation.

Pass log-probs in the same space as the loss (summed or length-normalized): U is defined on log-odds, and the two
spaces can disagree on which pairs lie in it. The trainers log each of these at every step, gathered over ranks
(`trl_cpo.diagnostics`); `trl_cpo.callbacks.DiagnosticsCallback` does the same for a plain `trl.DPOTrainer`.
"""

from __future__ import annotations

import torch

#: Tolerance the trainers use for U: the training forward and the reference precompute run with different batch shapes
#: (and, for 4-bit or bf16 models, different kernels), so an untrained policy's log-odds match the reference's only up
#: to ~1e-6 (fp32) .. 1e-3 (bf16) nats; pairs closer than this are not counted as having moved into U.
U_FRACTION_ATOL = 1e-4


def in_undesirable_space(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    atol: float = 0.0,
) -> torch.Tensor:
    r"""Boolean mask of the pairs in U: ``delta_ref + atol < delta_pi < 0``.

    There DPO's loss is already below ``log 2`` (the policy beats the reference's log-odds) while the policy still
    prefers the rejected response. ``atol = 0`` is the paper's definition; a small positive ``atol`` keeps float noise
    from counting an unchanged policy (``delta_pi == delta_ref`` up to round-off) as in U.
    """
    delta_pi = policy_chosen_logps.float() - policy_rejected_logps.float()
    delta_ref = ref_chosen_logps.float() - ref_rejected_logps.float()
    return (delta_ref + atol < delta_pi) & (delta_pi < 0)


def u_fraction(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    atol: float = 0.0,
) -> torch.Tensor:
    r"""Share of pairs in the undesirable space U: ``mean(delta_ref + atol < delta_pi < 0)``; a 0-dim float tensor."""
    mask = in_undesirable_space(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, atol=atol
    )
    return mask.float().mean()


def ref_misaligned_fraction(ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    r"""Share of pairs the reference gets wrong: ``mean(delta_ref < 0)``; a 0-dim float tensor.

    On these pairs DPO's implicit assumption (the reference already prefers the human-preferred response) fails.
    """
    return (ref_chosen_logps.float() < ref_rejected_logps.float()).float().mean()


# -- DPO diagnostics beyond U: what the policy itself prefers, where its likelihoods went, which pairs still learn -------

#: A pair's DPO-style gradient weight ``sigmoid(-z)`` below this counts as saturated (`saturated_fraction`).
SATURATION_WEIGHT = 0.01


def ranking_accuracy(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    r"""Share of pairs the model ranks the right way round: ``mean(logp(y_w) > logp(y_l))``; a 0-dim float tensor.

    Chen et al. 2024, "Preference learning algorithms do not learn preference rankings" (arXiv:2405.19534):
    the model's *own* preference, not its reward relative to the reference. Pass the policy's log-probs for
    ``ranking_accuracy``, the reference's for ``ref_ranking_accuracy`` (which is ``1 - mean(delta_ref <= 0)``: one
    minus the misaligned share, less the ties). A tie counts as wrong. DPO's ``rewards/accuracies``
    (``delta_pi > delta_ref``) counts a pair in U as right; this counts it as wrong.
    """
    return (chosen_logps.float() > rejected_logps.float()).float().mean()


def displaced(policy_chosen_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, *, atol: float = 0.0) -> torch.Tensor:
    r"""Boolean mask of the pairs whose chosen response lost likelihood: ``logp_pi(y_w) < logp_ref(y_w) - atol``."""
    return policy_chosen_logps.float() < ref_chosen_logps.float() - atol


def likelihood_displacement(
    policy_chosen_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, *, atol: float = 0.0
) -> torch.Tensor:
    r"""Share of pairs whose chosen log-prob fell below the reference's: ``mean(logp_pi(y_w) < logp_ref(y_w) - atol)``.

    Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"
    (arXiv:2410.08847): DPO can raise ``delta_pi`` by lowering both log-probs, the chosen one included, and move the
    mass to responses neither in the pair. ``atol`` (the trainers use `U_FRACTION_ATOL`) keeps round-off between the
    training forward and the reference precompute from counting an unchanged policy as displaced. A 0-dim float tensor.
    """
    return displaced(policy_chosen_logps, ref_chosen_logps, atol=atol).float().mean()


def both_fell(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    atol: float = 0.0,
) -> torch.Tensor:
    r"""Share of pairs whose chosen *and* rejected log-probs both fell below the reference's (each by more than
    ``atol``): ``mean(logp_pi(y_w) < logp_ref(y_w) - atol  and  logp_pi(y_l) < logp_ref(y_l) - atol)``.

    The case Razin et al. 2024 (arXiv:2410.08847) single out: the pair's log-odds can improve while the probability
    leaves both responses. A 0-dim float tensor.
    """
    fell = displaced(policy_chosen_logps, ref_chosen_logps, atol=atol)
    return (fell & displaced(policy_rejected_logps, ref_rejected_logps, atol=atol)).float().mean()


def dpo_weight(logits: torch.Tensor) -> torch.Tensor:
    r"""Per-pair gradient weight of a logistic loss ``-log sigmoid(z)``: ``sigmoid(-z)`` (its derivative is
    ``-sigmoid(-z)``), with ``z = beta * (delta_pi - target)`` the loss's logit (DPO: ``target = delta_ref``)."""
    return torch.sigmoid(-logits.float())


def saturated(logits: torch.Tensor, *, threshold: float = SATURATION_WEIGHT) -> torch.Tensor:
    r"""Boolean mask of the pairs whose gradient weight ``sigmoid(-z)`` is below ``threshold`` (``z > logit(1 -
    threshold)``, 4.6 for 0.01): they have stopped teaching anything."""
    return dpo_weight(logits) < threshold


def saturated_fraction(logits: torch.Tensor, *, threshold: float = SATURATION_WEIGHT) -> torch.Tensor:
    r"""Share of pairs whose DPO-style gradient weight ``sigmoid(-z)`` is below ``threshold`` (default 0.01).

    ``z`` is the logit of the run's own loss, ``beta * (delta_pi - target)``: DPO's ``target = delta_ref``, CPO's
    ``delta_ref + m / beta``, E-CPOC's floored target (see `trl_cpo.methods`). The gradient of
    ``-log sigmoid(z)`` scales with that weight (Rafailov et al. 2023, arXiv:2305.18290, "What does the DPO update
    do?"), so a saturated pair no longer moves the policy; a pair of U that saturates under DPO stays in U. A 0-dim
    float tensor.
    """
    return saturated(logits, threshold=threshold).float().mean()
