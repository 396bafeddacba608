"""Shared fixtures.

Flakiness loop (issue 15), 2026-12-06, on the 2-core CPU container, at commit 3ca2ea1, every test marked
`multiprocess` (53: DDP, FSDP2, resume, the kill test, torchrun recipes, teardown and exit):
`for i in $(seq 20); do PYTHONPATH=<clone> python -m pytest -q -m multiprocess -p no:cacheprovider; done` on a clean
clone, under load (three `bash .ci/run` runs of the full suite beside it for iterations 1 to 13, then alone; 1-minute
load average 1.4 to 3.8 at the ends of iterations, 171 to 276 s an iteration):
20 iterations run, 20 passed, 0 failed.
An earlier loop of the same command at commit 0c02fdd (44 tests) failed once in 14 iterations: test_diagnostics' CPO
launch aborted at interpreter exit ("terminate called without an active exception"), the race
trl_cpo/_distributed.py now mitigates (tests/test_distributed_exit.py amplifies it).
"""

import os
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
# A reference store of the session's own for fixtures wider than one test (the autouse fixture below gives each test an
# empty one): no test reads entries that other runs left in the user's store.
os.environ["TRL_CPO_REFERENCE_CACHE"] = tempfile.mkdtemp(prefix="trl-cpo-test-store-")

from datasets import Dataset  # noqa: E402
from helpers import REPO, WORDS, make_pairs, subprocess_env  # noqa: E402

from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def reference_store_dir(tmp_path_factory, monkeypatch):
    """Each test gets an empty reference store (trl_cpo.reference_store), so no test reads another's entries."""
    folder = tmp_path_factory.mktemp("reference-store")
    monkeypatch.setenv("TRL_CPO_REFERENCE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(WORDS)


@pytest.fixture
def model(tokenizer):
    return build_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def train_dataset():
    return Dataset.from_list(make_pairs(16, seed=0))


@pytest.fixture
def eval_dataset():
    return Dataset.from_list(make_pairs(8, seed=1))


@pytest.fixture(scope="session")
def gpu_suite_smoke(tmp_path_factory):
    """`benchmarks/gpu_suite.py --smoke` run once, in a subprocess (tests/test_gpu_suite.py and test_benchmarks.py
    both read it): (the finished process, its output directory)."""
    out = tmp_path_factory.mktemp("gpu-suite")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--output_dir", str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out
