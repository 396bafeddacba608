"""Per-pair log-prob helpers shared by the trainers, the precompute, the callback, the audit and the demo.

TRL stores completion log-probs summed over completion tokens. The methods run either on those sums (`loss_type`
'sigmoid') or on per-token averages ('sigmoid_norm', which divides by the completion token count). These helpers are
the one place that count and that conversion are made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: The `loss_type` entry that runs the preference term on per-token averaged log-probs.
LENGTH_NORMALIZED_LOSS = "sigmoid_norm"


def is_length_normalized(loss_type: str | Sequence[str]) -> bool:
    """Whether `loss_type` (a string or TRL's list) runs the preference term on per-token averaged log-probs."""
    return loss_type == LENGTH_NORMALIZED_LOSS if isinstance(loss_type, str) else LENGTH_NORMALIZED_LOSS in loss_type


def completion_lengths(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion token counts (float) of a `[chosen; rejected]` batch, counted as TRL's `sigmoid_norm` counts them.

    Not clamped (a count of 0 is kept, e.g. in the stored reference); the loss's clamped count is
    `trl_cpo._trl_compat.sigmoid_norm_lengths`.
    """
    lengths = completion_mask.sum(dim=1).float()
    return lengths.chunk(2, dim=0)


def per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Summed completion log-probs divided by the completion token count (clamped to 1, as TRL does)."""
    return logps.float() / lengths.float().clamp(min=1)


def to_loss_space(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    length_normalized: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (chosen, rejected) log-probs as the loss sees them: unchanged, or per-token if `length_normalized`."""
    if not length_normalized:
        return chosen_logps.float(), rejected_logps.float()
    return per_token(chosen_logps, chosen_lengths), per_token(rejected_logps, rejected_lengths)
