"""bitsandbytes 4-bit layers on CPU: keep them in the layout that trains.

On CPUs with AVX512-BF16, bitsandbytes (0.50.x) repacks a `Linear4bit` layer's weights, permanently, into a CPU
inference layout the first time the layer runs in eval mode on an input that needs no grad. That is exactly the
reference precompute on a freshly loaded model. The repacked layer then computes through `gemv_4bit`, which has no
backward, so a LoRA adapter on top of it gets no gradient (or a wrong one) for the rest of the run; bitsandbytes only
emits a `UserWarning`. Details, reproduction and the upstream report: docs/bitsandbytes-cpu-repack.md.

`keep_4bit_layers_trainable` switches the repack off on a model that is about to be trained (and refuses one that was
already repacked); the trainers call it before their reference precompute. `repacked_4bit_layers` lists layers that
are still repacked, for the first-step gradient check (`trl_cpo._grad_check`).

Every bitsandbytes internal this relies on is read in one function, `_bnb_cpu_inference_layout`.
"""

from __future__ import annotations

import sys

import torch

from . import _bnb_log


def _bnb_cpu_inference_layout(layer: torch.nn.Module, *, switch_off: bool = False) -> bool:
    """Whether a bitsandbytes `Linear4bit` holds its weights in bitsandbytes' CPU inference layout; with `switch_off`,
    first stop this layer from ever repacking into it.

    Relies on two bitsandbytes 0.50.2 internals (checked by `tests/test_qlora.py::test_bitsandbytes_repack_contract`):

    - `Linear4bit.support_avx512bf16_for_cpu`, an instance attribute set in `Linear4bit.__init__` from
      `has_avx512bf16()` (bitsandbytes/nn/modules.py line 573) and read by `Linear4bit.forward` (lines 613-620), which
      repacks when the input is on CPU, this flag is set, `not self.training` and `not x.requires_grad`;
    - `QuantState.packing_format_for_cpu`, set to True by `bitsandbytes.functional._convert_weight_packed_for_cpu`
      (bitsandbytes/functional.py line 1726) once the weights are repacked.

    A layer without the attribute (another bitsandbytes version) is left alone; the first-step gradient check
    (`trl_cpo._grad_check`) still catches a layer that stops passing gradients.
    """
    if switch_off and hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def _linear4bit_layers(model: torch.nn.Module):
    # bitsandbytes is imported by whatever built a 4-bit model; a model without one never needs it imported here.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of `model` in the layout that backpropagates, on any CPU.

    Switches off bitsandbytes' CPU inference repack for each `Linear4bit` layer of `model`. It stays off: later
    eval-mode forwards of this model (the reference precompute, evaluations between training steps, generation) use the
    regular dequantize + matmul path, as on CPUs without AVX512-BF16. To get the faster CPU inference kernel back once
    training is over, set `support_avx512bf16_for_cpu = True` on the layers or reload the model. A no-op for models
    without 4-bit layers, and on GPU, where bitsandbytes does not repack.

    Raises `ValueError` if some layers were already repacked (a forward in eval mode without gradients before this
    call): bitsandbytes' inverse conversion is lossy, and wrong for models quantized without double quantization
    (see docs/bitsandbytes-cpu-repack.md), so such a model is not trained.
    """
    layers = _linear4bit_layers(model)
    if any(layer.weight.device.type == "cpu" for _, layer in layers):
        _bnb_log.explain_once()  # the CPU inference kernel bitsandbytes could not fetch: what it means, once
    repacked = [name for name, layer in layers if _bnb_cpu_inference_layout(layer, switch_off=True)]
    if repacked:
        raise ValueError(
            f"{len(repacked)} bitsandbytes 4-bit layers of the model (first: {', '.join(repacked[:3])}) were already "
            "repacked into bitsandbytes' CPU inference layout, by a forward pass in eval mode without gradients (e.g. "
            "a `model.eval()` generation) before the trainer was built. In that layout they pass no gradient, or a "
            "wrong one, to LoRA adapters, and bitsandbytes cannot convert them back exactly. Reload the model and "
            "build the trainer before any such forward pass (the trainer switches the repack off), or call "
            "`model.train()` first. See docs/bitsandbytes-cpu-repack.md."
        )


def repacked_4bit_layers(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit layers of `model` that are in bitsandbytes' CPU inference layout."""
    return [name for name, layer in _linear4bit_layers(model) if _bnb_cpu_inference_layout(layer)]
