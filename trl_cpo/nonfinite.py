"""`stop_on_nonfinite`: no non-finite weight is ever saved or trained on.

A run can go non-finite in three places, each checked where it is cheapest and before anything is lost:

- the loss or the reference margin of a step (`check_loss`, in the trainers' loss step): NaN or inf there stops
  training before the backward pass. This is also what stops a run whose weights became non-finite in the previous
  update: the next forward gives a non-finite loss, before it is trained on;
- the gradients of a step (`NonFiniteGradientGuard`, just before `optimizer.step()`): a NaN or inf gradient stops
  training before the update. Under fp16 mixed precision the gradient scaler skips such steps by itself (and lowers
  its scale), so the check is left to it;
- the weights, before each save (`check_weights`): an update can overflow with finite gradients (a learning rate of
  1e39 in fp32, fp16 weights with a large one), and the checkpoint is then not written.

Every check stops all processes together (the verdicts agree across ranks, or are gathered when ranks hold shards).
Cost: one pass over the gradients per
optimizer step (a fused sum per parameter), one over the weights per save.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

#: Names shown in an error before the rest are counted.
NAMES_SHOWN = 5


def _non_finite(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
    # A finite sum implies finite entries; a non-finite sum may be an overflow of large finite entries, so it is
    # confirmed entry by entry.
    bad = []
    for name, tensor in tensors:
        if not torch.isfinite(tensor.detach().sum(dtype=torch.float32)) and not torch.isfinite(tensor).all():
            bad.append(name)
    return bad


def _any_rank(trainer, found: bool) -> bool:
    # Under DDP (and on one process) every rank holds the same weights and, after the all-reduce, the same gradients,
    # so every rank reaches the same verdict without a collective. Sharded (FSDP, DeepSpeed) ranks check their own
    # shards: the verdict is gathered, so that no rank raises alone while the others wait in the next collective.
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return found
    flag = torch.tensor([1.0 if found else 0.0], device=trainer.accelerator.device)
    return bool(trainer.accelerator.gather(flag).max().item())


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


_OFF = (
    "Set stop_on_nonfinite=False to keep TRL's behaviour instead (the step runs, and the weights and checkpoints can "
    "hold NaN or inf)."
)


def check_loss(trainer, loss: torch.Tensor, margin: torch.Tensor) -> None:
    """Raise `FloatingPointError` before a non-finite loss or margin reaches the backward pass."""
    flags = torch.stack([~torch.isfinite(margin).all(), ~torch.isfinite(loss).all()]).float().to(loss.device)
    margin_bad, loss_bad = trainer.accelerator.gather(flags.unsqueeze(0)).amax(dim=0).tolist()
    if not (margin_bad or loss_bad):
        return
    what = "reference margin" if margin_bad else "loss"
    cause = (
        "the per-pair margins come from the reference log-probs: a damaged reference file or data"
        if margin_bad
        else "weights made non-finite by the previous update (a learning rate that diverges), fp16 overflow (use bf16 "
        "or fp32), or bad inputs"
    )
    raise FloatingPointError(
        f"Non-finite {what} (NaN or inf) at training step {trainer.state.global_step + 1}: training stopped before "
        f"this step's backward pass and update. Checked: the loss and the per-pair reference margins of every "
        f"micro-batch. Likely cause: {cause}. Fix it and resume from the last checkpoint "
        f"(resume_from_checkpoint=True), which holds finite weights. {_OFF}"
    )


def check_weights(trainer, model: torch.nn.Module, where: str) -> None:
    """Raise `FloatingPointError` if a parameter of `model` holds NaN or inf (before it is saved to `where`)."""
    bad = _non_finite(list(model.named_parameters()))
    if not _any_rank(trainer, bool(bad)):
        return
    raise FloatingPointError(
        f"Not saving {where}: after training step {trainer.state.global_step} the weights hold NaN or inf "
        f"({_names(bad) if bad else 'on another process'}), though that step's loss and gradients were finite: the "
        "update itself overflowed (a learning rate far too large, or fp16 weights). Checked: every parameter, before "
        "each save. No checkpoint with these weights was written; the earlier checkpoints hold finite weights. Lower "
        f"the learning rate (or train in bf16 / fp32) and resume from the last checkpoint. {_OFF}"
    )


class NonFiniteGradientGuard(TrainerCallback):
    """Stop training before `optimizer.step()` when a gradient is NaN or inf (not under fp16, whose gradient scaler
    skips those steps itself)."""

    def __init__(self, trainer):
        self._trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        bad = _non_finite(grads)
        if not _any_rank(self._trainer, bool(bad)):
            return
        raise FloatingPointError(
            f"Non-finite gradient (NaN or inf) at training step {state.global_step + 1} "
            f"({_names(bad) if bad else 'on another process'}): training stopped before this step's update. Checked: "
            "every gradient, before each optimizer step. Likely cause: a learning rate or inputs that make the loss "
            "overflow in the backward pass, or fp16 without its gradient scaler. Fix it and resume from the last "
            f"checkpoint (resume_from_checkpoint=True). {_OFF}"
        )
