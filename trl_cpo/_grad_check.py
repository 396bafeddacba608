"""A check, on the first optimizer step of each `train()` call, that training reaches the trainable parameters.

A run whose trainable parameters get no gradient still "trains": the loss is logged, checkpoints are written, the
process exits 0, and nothing has learned. The known cause is bitsandbytes' CPU inference repack of 4-bit layers
(`trl_cpo.quantization`); others are a forward that detaches the model. These stop the run, as do non-finite
gradients. Some trainable parameters without a gradient is normal for some models (a vision-language model never
uses its vision tower's last layer, and not at all on text-only data; DPOTrainer trains them as they are), so that
case is named in a warning and training goes on. The check runs once, after the backward passes of the first step and
before `optimizer.step()` (the `on_pre_optimizer_step` callback event of `transformers.Trainer`), so it costs one
pass over the gradients.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from .quantization import repacked_4bit_layers

#: How many parameter names an error lists before summarising the rest as a count.
NAMES_SHOWN = 5

logger = logging.getLogger(__name__)

#: Why trainable parameters may get no gradient, and what to do.
_NO_GRADIENT_CAUSES = (
    "Likely causes: parameters that take no part in the loss (an unused head or tower: freeze them with "
    "`requires_grad_(False)`), or a forward that cuts the graph (torch.no_grad, .detach(), a custom op without "
    "a backward, gradient checkpointing on inputs that need no grad)."
)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def _is_finite(grad: torch.Tensor) -> bool:
    # A finite sum implies finite entries, without a mask the size of the gradient; a non-finite sum may be an overflow
    # of large finite entries, so it is confirmed entry by entry.
    return bool(torch.isfinite(grad.sum(dtype=torch.float32))) or bool(torch.isfinite(grad).all())


def check_first_step_gradients(model: torch.nn.Module, *, inspect_grads: bool = True, check_finite: bool = True):
    """Raise `RuntimeError` if the step about to be taken cannot train `model` as intended.

    Checks that no bitsandbytes 4-bit layer is in bitsandbytes' CPU inference layout (whose matmul has no backward) and,
    if `inspect_grads`, that some parameter with `requires_grad` holds a gradient and that the gradients are finite (if
    `check_finite`). Trainable parameters without a gradient, while others have one, are named in a warning. Messages
    name the parameters (the first few and a count) and the likely cause.
    """
    repacked = repacked_4bit_layers(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None] if inspect_grads else []
    non_finite = []
    if inspect_grads and check_finite:
        non_finite = [name for name, p in trainable if p.grad is not None and not _is_finite(p.grad)]
    if missing and len(missing) < len(trainable) and not (repacked or non_finite):
        logger.warning(
            "%d of %d trainable parameters got no gradient on the first step and will not train: %s. %s",
            len(missing),
            len(trainable),
            _names(missing),
            _NO_GRADIENT_CAUSES,
        )
        return
    if not (repacked or missing or non_finite):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(trainable)} trainable parameters got no gradient: {_names(missing)}.")
    if non_finite:
        problems.append(f"{len(non_finite)} trainable parameters got a NaN or inf gradient: {_names(non_finite)}.")
    if repacked:
        import bitsandbytes

        problems.append(
            f"{len(repacked)} bitsandbytes 4-bit layers are in bitsandbytes' CPU inference layout "
            f"({_names(repacked)}), whose matmul (gemv_4bit) has no backward: gradients through them are dropped, so "
            "LoRA adapters get none or wrong ones. bitsandbytes repacks a layer on CPUs with AVX512-BF16 when it runs "
            "in eval mode on an input that needs no grad; trl_cpo switches that off "
            "(trl_cpo.quantization.keep_4bit_layers_trainable), so the installed bitsandbytes "
            f"{bitsandbytes.__version__} must repack in a way this version of trl_cpo does not know. Work around it by "
            "calling `model.train()` before building the trainer and keeping the model out of eval-mode forwards (no "
            "eval during training), or install bitsandbytes 0.50.x, and please report it. See "
            "docs/bitsandbytes-cpu-repack.md."
        )
    elif missing:
        problems.append(_NO_GRADIENT_CAUSES)
    if non_finite and not missing and not repacked:
        problems.append(
            "Check the model's weights and dtype (fp16 overflows easily; use bf16 or fp32) and the learning setup."
        )
    raise RuntimeError(
        "Training cannot proceed: the first step would not train the model as intended. " + " ".join(problems)
    )


class FirstStepGradientCheck(TrainerCallback):
    """Run `check_first_step_gradients` on the first optimizer step of each `train()` call.

    `inspect_grads=False` keeps only the 4-bit layout check, for DeepSpeed and FSDP, where `.grad` does not hold each
    rank's full gradient. The finiteness check is skipped under fp16 mixed precision, where the loss scaler makes
    inf gradients on the first steps normal (it skips those steps).
    """

    def __init__(self, inspect_grads: bool = True):
        self.inspect_grads = inspect_grads
        self._pending = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._pending = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._pending or model is None:
            return
        self._pending = False
        check_first_step_gradients(model, inspect_grads=self.inspect_grads, check_finite=not args.fp16)
