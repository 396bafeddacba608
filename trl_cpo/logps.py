"""Per-pair log-prob helpers shared by the trainers, the precompute, the callback, the audit and the demo.

TRL stores completion log-probs summed over completion tokens. The methods run either on those sums (`loss_type`
'sigmoid') or on per-token averages ('sigmoid_norm', which divides by the completion token count). These helpers are
the one place that count and that conversion are made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from . import _trl_compat

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


class PolicyLogpsRecorder:
    """Keep the per-token log-probs of the policy's fused-head forward made inside `recording()`.

    DPOTrainer reduces the policy log-probs to a scalar loss; the U-fraction and the DPO-meaning rewards need them per
    pair. A forward hook on the outermost model sees the output of that one forward (DDP, FSDP and DeepSpeed call the
    module through `__call__`), so no second forward is needed.
    """

    def __init__(self, model: torch.nn.Module):
        self._active = False
        self.log_probs: torch.Tensor | None = None
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        log_probs = _trl_compat.fused_head_log_probs(kwargs, output) if self._active else None
        if log_probs is not None and self.log_probs is None:
            self.log_probs = log_probs.detach()

    @contextlib.contextmanager
    def recording(self):
        self._active, self.log_probs = True, None
        try:
            yield self
        finally:
            self._active = False

    def sequence_logps(self, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.log_probs is None:
            raise RuntimeError(
                _trl_compat.ASSUMPTIONS["fused_lm_head"].broken("no fused-LM-head forward of the policy was seen")
            )
        # Same reduction as DPOTrainer without ld_alpha (rejected by the config): the fused head already zeroes
        # non-completion positions, so a plain sum over the (shifted) sequence is the completion log-prob.
        return _trl_compat.summed_completion_logps(self.log_probs, completion_mask)
