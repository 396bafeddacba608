"""bitsandbytes' import-time probe for a hub CPU kernel: no noise on import, one plain line where it matters.

With bitsandbytes installed, `import transformers.trainer_utils` imports peft (transformers/trainer_utils.py, "if
is_peft_available()"), and peft imports bitsandbytes (peft/helpers.py), whatever the run quantizes. On CPUs with
AVX512-BF16, bitsandbytes 0.50 then asks the `kernels` package for a fused `gemm_4bit_forward` kernel from the Hub repo
`kernels-community/quantization-bitsandbytes` (bitsandbytes/backends/cpu/ops.py). Offline, or when the kernel is not
cached, two records come out of that probe:

- kernels (0.19, `kernels._internals.hf_hub`): "Skipping publisher trust check for 'kernels-community/
  quantization-bitsandbytes' because Hugging Face Hub is in offline mode.";
- bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community: <why>. Please make sure ...".

What the missing kernel means: bitsandbytes' CPU *inference* layout of 4-bit weights computes through its built-in C++
kernel instead of the hub one (slower, same result). Training never uses that layout: the trainers switch it off
(`trl_cpo.quantization.keep_4bit_layers_trainable`), because it has no backward. So for a trl-cpo run the records are
noise on every command, quantized or not. `install()` drops exactly those two records (the kernels one only for that
repo), keeps the reason, and `explain_once()` says in one line what it means when a run actually holds 4-bit layers
on a CPU (`trl_cpo.quantization`). Every other record of both loggers passes. The texts are contract-tested against
the installed bitsandbytes and kernels sources (tests/test_bnb_log.py).
"""

from __future__ import annotations

import logging

#: The logger bitsandbytes 0.50 emits its notice on (`logging.getLogger(__name__)` in backends/cpu/ops.py).
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
#: The start of bitsandbytes' notice.
KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"
#: The Hub repo bitsandbytes probes for the kernel.
KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
#: The logger kernels 0.19 emits its offline notice on (`logging.getLogger(__name__)` in _internals/hf_hub.py).
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
#: The start of kernels' offline notice, for bitsandbytes' repo only.
TRUST_NOTICE = f"Skipping publisher trust check for '{KERNEL_REPO}'"

#: Why the probe failed (bitsandbytes' exception text), once it has; None while it has not.
probe_failure: str | None = None
_explained = False

logger = logging.getLogger(__name__)


class _DropProbeNotice(logging.Filter):
    def __init__(self, prefix: str, keep_reason: bool):
        super().__init__()
        self.prefix, self.keep_reason = prefix, keep_reason

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.keep_reason:
            global probe_failure
            probe_failure = str(record.args[0]) if record.args else record.getMessage()
        return False


def install() -> None:
    """Attach both filters (idempotent). Must run before bitsandbytes is imported; imports nothing heavy."""
    for name, prefix, keep_reason in (
        (BNB_CPU_OPS_LOGGER, KERNEL_NOTICE, True),
        (KERNELS_HUB_LOGGER, TRUST_NOTICE, False),
    ):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropProbeNotice) for f in target.filters):
            target.addFilter(_DropProbeNotice(prefix, keep_reason))


def explain_once() -> str | None:
    """Say once per process, if bitsandbytes' probe failed, what the missing hub kernel means; return the line."""
    global _explained
    if probe_failure is None or _explained:
        return None
    _explained = True
    line = (
        f"bitsandbytes could not load its fused CPU 4-bit inference kernel from the Hub ({KERNEL_REPO}: "
        f"{probe_failure.splitlines()[0][:200]}). Training is unaffected: trl-cpo keeps 4-bit layers in the trainable "
        "layout, which never uses that kernel. Only 4-bit CPU inference in bitsandbytes' packed layout is slower "
        "without it (bitsandbytes falls back to its built-in kernel)."
    )
    logger.warning(line)
    return line
