"""bitsandbytes' import-time probe for a hub CPU kernel (`trl_cpo._bnb_log`): no bitsandbytes or kernels line.

The probe runs only on CPUs with AVX512-BF16, so each test forces the path it checks, on any CPU: a meta-path hook makes
`bitsandbytes.functional.has_avx512bf16` answer as told just before bitsandbytes' CPU backend module runs. Offline
(`HF_HUB_OFFLINE=1`, as CI runs) and online with an unreachable Hub (`HF_ENDPOINT` on a closed local port) are both
covered, since the two fail with different records.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, subprocess_env

from trl_cpo import _bnb_log

FORCE_AVX512_BF16 = textwrap.dedent(
    """
    import importlib.abc, sys
    class ForceProbe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "bitsandbytes.backends.cpu.ops":
                sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: {force}
            return None
    sys.meta_path.insert(0, ForceProbe())
    """
)

IMPORT_TRAINERS = textwrap.dedent(
    """
    from trl_cpo import CPOTrainer, ECPOCTrainer, _bnb_log
    assert "bitsandbytes.backends.cpu.ops" in sys.modules
    print("PROBE_FAILED" if _bnb_log.probe_failure else "PROBE_QUIET")
    print("MARK", file=sys.stderr, flush=True)  # what comes after is the explanation only
    line = _bnb_log.explain_once()
    assert _bnb_log.explain_once() is None  # once per process
    print("EXPLAINED" if line and _bnb_log.KERNEL_REPO in line and "Training is unaffected" in line else "SILENT")
    """
)


def run_forced(force: bool, **env_overrides) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.update(env_overrides)
    code = FORCE_AVX512_BF16.format(force=force) + IMPORT_TRAINERS
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_no_library_line(stderr: str) -> None:
    for word in ("bitsandbytes", "kernels", "gemm_4bit", "publisher trust"):
        assert word not in stderr, stderr[-3000:]


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"HF_HUB_OFFLINE": "1"}, id="offline"),
        pytest.param({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, id="online-unreachable"),
    ],
)
def test_probe_failure_prints_nothing_on_import_and_is_explained_once(env):
    pytest.importorskip("kernels")
    proc = run_forced(True, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_import, explanation = proc.stderr.split("MARK\n")
    assert_no_library_line(on_import)
    assert proc.stdout.split() == ["PROBE_FAILED", "EXPLAINED"]
    assert len(explanation.strip().splitlines()) == 1  # one line, ours


def test_cpu_without_avx512_bf16_runs_no_probe_and_explains_nothing():
    proc = run_forced(False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_no_library_line(proc.stderr.replace("MARK\n", ""))
    assert proc.stdout.split() == ["PROBE_QUIET", "SILENT"]


def test_filters_match_the_installed_sources_and_drop_only_their_records():
    ops = pytest.importorskip("bitsandbytes.backends.cpu.ops")
    source = inspect.getsource(ops)
    # Contract with bitsandbytes 0.50 (backends/cpu/ops.py): the probe's repo, its notice and the logger it goes to.
    assert _bnb_log.KERNEL_NOTICE in source and _bnb_log.KERNEL_REPO in source, "update trl_cpo._bnb_log"
    assert ops.logger.name == _bnb_log.BNB_CPU_OPS_LOGGER
    hf_hub = pytest.importorskip("kernels._internals.hf_hub")
    # Contract with kernels 0.19 (_internals/hf_hub.py): the offline notice and its logger.
    assert "Skipping publisher trust check for '{repo_id}'" in inspect.getsource(hf_hub), "update trl_cpo._bnb_log"
    assert hf_hub.logger.name == _bnb_log.KERNELS_HUB_LOGGER

    def passes(logger_name, msg, args=("x",)):
        record = logging.LogRecord(logger_name, logging.WARNING, __file__, 1, msg, args, None)
        return logging.getLogger(logger_name).filter(record)

    assert not passes(_bnb_log.BNB_CPU_OPS_LOGGER, _bnb_log.KERNEL_NOTICE + " from kernels-community: %s.")
    assert passes(_bnb_log.BNB_CPU_OPS_LOGGER, "Some other bitsandbytes warning: %s")
    assert not passes(_bnb_log.KERNELS_HUB_LOGGER, _bnb_log.TRUST_NOTICE + " because Hugging Face Hub is offline.", ())
    # The same notice for any other repo signals something the user asked for: it passes.
    assert passes(_bnb_log.KERNELS_HUB_LOGGER, "Skipping publisher trust check for 'someone/other-kernel' because", ())
