r"""Diagnostics of the undesirable solution space U (arXiv:2605.20834, Def. 3.3), as pure functions.

Pass log-probs in the same space as the loss (summed or length-normalized): U is defined on log-odds, and the two
spaces can disagree on which pairs lie in it.
"""

from __future__ import annotations

import torch


def in_undesirable_space(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    r"""Boolean mask of the pairs in U: ``delta_ref < delta_pi < 0``.

    There DPO's loss is already below ``log 2`` (the policy beats the reference's log-odds) while the policy still
    prefers the rejected response.
    """
    delta_pi = policy_chosen_logps.float() - policy_rejected_logps.float()
    delta_ref = ref_chosen_logps.float() - ref_rejected_logps.float()
    return (delta_ref < delta_pi) & (delta_pi < 0)


def u_fraction(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    r"""Share of pairs in the undesirable space U: ``mean(delta_ref < delta_pi < 0)``; a 0-dim float tensor."""
    mask = in_undesirable_space(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return mask.float().mean()


def ref_misaligned_fraction(ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    r"""Share of pairs the reference gets wrong: ``mean(delta_ref < 0)``; a 0-dim float tensor.

    On these pairs DPO's implicit assumption (the reference already prefers the human-preferred response) fails.
    """
    return (ref_chosen_logps.float() < ref_rejected_logps.float()).float().mean()
