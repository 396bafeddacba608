"""Test harness: real FSDP2 (PyTorch `fully_shard`) on CPU processes, for the 2-process tests. Never used by the package.

Why a patch is needed. accelerate 1.15 turns FSDP on in `accelerate/state.py`, `AcceleratorState.__init__`, in the
branch `elif self.distributed_type in [DistributedType.MULTI_GPU, MULTI_MLU, MULTI_SDAA, MULTI_MUSA, MULTI_NPU,
MULTI_XPU, MULTI_HPU, MULTI_NEURON]:`, which does

    if os.environ.get("ACCELERATE_USE_FSDP", ...) == "true" or fsdp_plugin is not None (or context parallelism):
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no" and fsdp_plugin is not None:
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin

and then `PartialState._shared_state["distributed_type"] = self.distributed_type`. `DistributedType.MULTI_CPU` is
not in that list, so with `use_cpu=True` the plugin that transformers' Trainer builds from `fsdp=True` /
`fsdp_config` is dropped without a word and the run is plain DDP. PyTorch's `fully_shard` itself works on a CPU
device mesh over gloo, and so does everything downstream that keys off `distributed_type == FSDP` /
`state.fsdp_plugin` (transformers' `Trainer.is_fsdp_enabled`, accelerate's `fsdp2_prepare_model`, FSDP checkpoint
save/load, TRL's `prepare_fsdp`).

`enable_cpu_fsdp2()` wraps `AcceleratorState.__init__` and, after it ran, does for `MULTI_CPU` what the branch above
does for `MULTI_GPU`: distributed type FSDP and the plugin kept. Only for an FSDP *version 2* plugin (FSDP1 wraps with
`device_id=accelerator.device`, which is CUDA-only in practice) and only without mixed precision (bf16 FSDP2 mixed
precision is a GPU setting; on CPU the tests run fp32, and a mixed-precision request is refused here rather than
silently ignored).

Traps this module also handles:
- `Accelerator.__init__` sets `ACCELERATE_USE_FSDP=true` in `os.environ` when given a plugin, and transformers'
  `TrainingArguments` sets `FSDP_CPU_RAM_EFFICIENT_LOADING`. Both outlive the trainer: a later trainer in the same
  process would build a default plugin (FSDP1, which fails on CPU in TRL's `prepare_fsdp`) and `from_pretrained`
  would load on the meta device on non-zero ranks. `clear_fsdp_env()` removes them; the workers call it before every
  scenario, and FSDP runs only ever happen in `torchrun` subprocesses, never in the pytest process.
- `fsdp2_facts(trainer)` records what makes a run FSDP2 (world size, distributed type, model class, DTensor
  parameters sharded over the ranks), so a test fails if a run silently fell back to DDP or to one process.
"""

from __future__ import annotations

import functools
import os

#: Environment variables that accelerate / transformers set for an FSDP run and that leak into later trainers
#: (`ACCELERATE_USE_FSDP`, `FSDP_CPU_RAM_EFFICIENT_LOADING`, and the `FSDP_*` family `accelerate launch` sets).
FSDP_ENV_VAR = "ACCELERATE_USE_FSDP"
FSDP_ENV_PREFIX = "FSDP_"


def enable_cpu_fsdp2() -> None:
    """Patch accelerate so that multi-process CPU runs given an FSDP2 plugin really use FSDP2 (idempotent)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_cpu_fsdp2_patch", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is None or getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            return
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if self._mixed_precision != "no":
            raise ValueError(
                f"CPU FSDP2 test harness: mixed_precision={self._mixed_precision!r} is not supported on CPU; run the "
                "comparison in fp32 (bf16=False, fp16=False)."
            )
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._cpu_fsdp2_patch = True
    AcceleratorState.__init__ = __init__


def clear_fsdp_env() -> None:
    """Drop the FSDP switches a previous trainer left in `os.environ` (see the module docstring)."""
    for name in list(os.environ):
        if name == FSDP_ENV_VAR or name.startswith(FSDP_ENV_PREFIX):
            del os.environ[name]


def _plugin_settings(plugin) -> dict | None:
    if plugin is None:
        return None
    mixed_precision = plugin.mixed_precision_policy
    return {
        "state_dict_type": plugin.state_dict_type.name,
        "reshard_after_forward": plugin.reshard_after_forward,
        "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
        "activation_checkpointing": plugin.activation_checkpointing,
        "offload_policy": type(plugin.cpu_offload).__name__,  # OffloadPolicy (none) or CPUOffloadPolicy
        "mixed_precision_policy": None if mixed_precision is None else str(mixed_precision),
    }


def fsdp2_facts(trainer) -> dict:
    """What the test asserts to know the run was FSDP2 over all ranks, as JSON-able values."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    params = list(trainer.model_wrapped.named_parameters())
    dtensors = [(name, p) for name, p in params if isinstance(p, DTensor)]
    meshes = {(p.device_mesh.device_type, p.device_mesh.size()) for _, p in dtensors}
    # Sharded on dim 0 across the mesh, with a local shard really smaller than the whole tensor.
    sharded = [name for name, p in dtensors if p.placements == (Shard(0),) and p.to_local().numel() < p.numel()]
    return {
        "num_processes": trainer.accelerator.num_processes,
        "process_index": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "fsdp_plugin": _plugin_settings(plugin),
        "model_class": type(trainer.model_wrapped).__name__,
        # The modules `fully_shard` was applied to: the root and, with TRANSFORMER_BASED_WRAP, each decoder layer.
        "fsdp_modules": sorted(type(m).__name__ for m in trainer.model_wrapped.modules() if isinstance(m, FSDPModule)),
        "num_parameters": len(params),
        "num_dtensor_parameters": len(dtensors),
        "num_sharded_parameters": len(sharded),
        "meshes": sorted([device, size] for device, size in meshes),
        "local_numel": sum(p.to_local().numel() for _, p in dtensors),
        "global_numel": sum(p.numel() for _, p in dtensors),
    }
