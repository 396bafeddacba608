"""Keep bitsandbytes' import-time CPU-kernel notice out of runs that cannot use that kernel.

With bitsandbytes installed, `import transformers.trainer_utils` imports peft (transformers/trainer_utils.py, "if
is_peft_available()"), and peft imports bitsandbytes (peft/helpers.py), whatever the run quantizes. On CPUs with
AVX512-BF16, bitsandbytes 0.50 then tries to fetch a fused `gemm_4bit_forward` kernel through the `kernels` package and,
when that fails, logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." (bitsandbytes/backends/cpu/
ops.py). That kernel only serves bitsandbytes' CPU *inference* layout of 4-bit weights, which the trainers switch off
(`trl_cpo.quantization.keep_4bit_layers_trainable`): no trl-cpo run ever calls it, quantized or not, so the notice
is noise that every command printed. This filter drops that one record and nothing else from that logger.
"""

from __future__ import annotations

import logging

#: The logger bitsandbytes 0.50 emits the notice on (`logging.getLogger(__name__)` in backends/cpu/ops.py).
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
#: The start of the one message dropped.
KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNEL_NOTICE)


def install() -> None:
    """Attach the filter (idempotent). Must run before bitsandbytes is imported; cheap, imports nothing heavy."""
    logger = logging.getLogger(BNB_CPU_OPS_LOGGER)
    if not any(isinstance(f, _DropKernelNotice) for f in logger.filters):
        logger.addFilter(_DropKernelNotice())
