r"""Diagnostics of the undesirable solution space U (arXiv:2605.20834, Def. 3.3), as pure functions.

Pass log-probs in the same space as the loss (summed or length-normalized): U is defined on log-odds, and the two
spaces can disagree on which pairs lie in it.
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
