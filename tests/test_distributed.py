"""CPO and E-CPOC under two real CPU processes (torchrun, DDP over gloo) against one process on the same data.

`tests/scripts/ddp_worker.py` runs under `python -m torch.distributed.run --nproc_per_node 2` (world size 2, checked
from `trainer.accelerator.num_processes` on every rank) and in this process (world size 1), over the same 24 pairs,
loaded from memory (`Dataset.from_list`) and from disk (`save_to_disk` + `load_from_disk`). Each comparison is built so
that equality is exact up to float32 round-off, whatever the sampler puts on which rank:

- Phase A (epoch means): `learning_rate=0` and a separate reference model initialised differently from the policy,
  so the weights never move and each pair's loss, U membership, reference misalignment, margin and rewards are fixed
  numbers independent of order and grouping. With a global batch of 8 pairs in both runs (2 x 4 vs 1 x 8) every
  step has the same size, so the epoch mean of the per-step means (logged once, `logging_steps` = steps per epoch)
  is the plain mean over all 24 pairs, in both runs. The test also recomputes that mean from per-pair log-probs, and
  checks that the mean over the pairs rank 0 alone saw (recorded by the worker) differs from it for every metric:
  a metric logged from rank 0's pairs only would fail the comparison.
- Phase B (training): `learning_rate>0` and a global batch of all 24 pairs (2 x 12 vs 1 x 24), so every optimizer
  step sees every pair in both runs: DDP's gradient average over the two ranks equals the one-process gradient, and
  the per-step metrics and the trained weights must match.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import REPO, first_step_accuracy_is_roundoff, free_port, make_pairs, subprocess_env
from safetensors.torch import load_file

from trl_cpo.losses import cpo_margin, ecpoc_target
from trl_cpo.methods import METHODS
from trl_cpo.metrics import U_FRACTION_ATOL
from trl_cpo.tiny import build_tiny_llama

#: Launches several processes: in the 20x loop of issue 15 (`pytest -m multiprocess`).
pytestmark = pytest.mark.multiprocess

WORKER = REPO / "tests" / "scripts" / "ddp_worker.py"
NUM_PAIRS = 24
BETA = 2.5  # CPOConfig / ECPOCConfig default, used by the worker
SCENARIOS = [
    {"name": "cpo-memory-A", "method": "cpo", "source": "memory", "phase": "A"},
    {"name": "cpo-disk-A", "method": "cpo", "source": "disk", "phase": "A"},
    {"name": "ecpoc-memory-A", "method": "ecpoc", "source": "memory", "phase": "A"},
    {"name": "ecpoc-disk-A", "method": "ecpoc", "source": "disk", "phase": "A"},
    {"name": "cpo-memory-B", "method": "cpo", "source": "memory", "phase": "B"},
    {"name": "ecpoc-disk-B", "method": "ecpoc", "source": "disk", "phase": "B"},
]
PHASE_A = [s["name"] for s in SCENARIOS if s["phase"] == "A"]
PHASE_B = [s["name"] for s in SCENARIOS if s["phase"] == "B"]
COMPARED = [
    "loss",
    "u_fraction",
    "ref_misaligned_fraction",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]


def margin_metric(name):
    """The per-pair quantity the scenario's method logs (`cpo_margin`, `ecpoc_target`)."""
    return METHODS[name.split("-")[0]].metric_name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ddp")
    for name, seed in (("policy", 0), ("reference", 1)):
        build_tiny_llama(tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = make_pairs(NUM_PAIRS, seed=3)
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    Dataset.from_list(rows).save_to_disk(str(root / "pairs-on-disk"))
    base = {
        "model_dir": str(root / "policy"),
        "ref_model_dir": str(root / "reference"),
        "data_jsonl": str(root / "pairs.jsonl"),
        "disk_dir": str(root / "pairs-on-disk"),
        "num_pairs": NUM_PAIRS,
        "phase_a_global_batch": 8,
        "phase_b_lr": 1e-2,
        "phase_b_epochs": 3,
        "scenarios": SCENARIOS,
    }
    out = {}
    for world in (2, 1):
        out[world] = root / f"world{world}"
        out[world].mkdir()
    spec2 = root / "spec2.json"
    spec2.write_text(json.dumps({**base, "out_dir": str(out[2])}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(spec2)], env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    # The one-process baseline runs here (world size 1), plus the policy's per-pair log-probs for the recomputation.
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.run({**base, "out_dir": str(out[1]), "policy_table": True})

    def load(world, name, rank=0):
        return json.loads((out[world] / f"{name}.rank{rank}.json").read_text())

    return {"load": load, "out": out, "root": root}


def logged(result):
    return [entry for entry in result["log_history"] if "loss" in entry]


def test_two_real_processes(runs):
    for scenario in SCENARIOS:
        ranks = [runs["load"](2, scenario["name"], rank) for rank in (0, 1)]
        assert [r["process_index"] for r in ranks] == [0, 1]
        for r in ranks:
            assert r["num_processes"] == 2
            assert r["distributed_type"] == "DistributedType.MULTI_CPU"
            assert r["model_class"] == "DistributedDataParallel"
            assert r["train_rows"] == NUM_PAIRS
        single = runs["load"](1, scenario["name"])
        assert single["num_processes"] == 1 and single["model_class"] != "DistributedDataParallel"


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS])
def test_reference_precompute_is_gathered_on_every_rank(runs, name):
    # Every rank holds the full per-pair reference (in dataset order), identical to the one-process precompute.
    single = runs["load"](1, name)["reference"]
    for rank in (0, 1):
        reference = runs["load"](2, name, rank)["reference"]
        for key, values in reference.items():
            assert len(values) == NUM_PAIRS
            torch.testing.assert_close(torch.tensor(values), torch.tensor(single[key]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PHASE_A)
def test_epoch_means_match_one_process(runs, name):
    single, ranks = runs["load"](1, name), [runs["load"](2, name, rank) for rank in (0, 1)]
    (one,), (two,), (two_rank1,) = logged(single), logged(ranks[0]), logged(ranks[1])
    for key in [*COMPARED, margin_metric(name)]:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
        assert two_rank1[key] == two[key], f"{key}: ranks logged different values"


@pytest.mark.parametrize("name", PHASE_A)
def test_logged_metrics_cover_both_ranks(runs, name):
    """The logged epoch means equal means over all 24 pairs, and differ from means over rank 0's pairs alone."""
    single = runs["load"](1, name)
    policy = json.loads((runs["out"][1] / "policy_table.json").read_text())
    ref = {k: torch.tensor(v) for k, v in single["reference"].items()}
    pol = {k: torch.tensor(v) for k, v in policy.items()}
    torch.testing.assert_close(pol["chosen_lengths"], ref["chosen_lengths"])
    n_c, n_r = ref["chosen_lengths"], ref["rejected_lengths"]
    delta_pi = pol["chosen"] / n_c - pol["rejected"] / n_r  # length-normalized, the loss's space
    delta_ref = ref["chosen"] / n_c - ref["rejected"] / n_r
    if name.startswith("cpo"):
        margin = cpo_margin(ref["chosen"] / n_c, ref["rejected"] / n_r, gamma=0.05)
        loss, metric = -F.logsigmoid(BETA * (delta_pi - delta_ref) - margin), margin
    else:
        target = ecpoc_target(ref["chosen"] / n_c, ref["rejected"] / n_r, gamma=0.5, tau=2.0, alpha=1.0)
        loss, metric = -F.logsigmoid(BETA * (delta_pi - target)), target
    chosen_rewards, rejected_rewards = (
        BETA * (pol["chosen"] - ref["chosen"]),
        BETA * (pol["rejected"] - ref["rejected"]),
    )
    per_pair = {
        "loss": loss,
        "u_fraction": ((delta_ref + U_FRACTION_ATOL < delta_pi) & (delta_pi < 0)).float(),
        "ref_misaligned_fraction": (delta_ref < 0).float(),
        margin_metric(name): metric,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
    }

    def pair_index(seen):
        index = []
        for chosen, rejected in seen:
            distance = (ref["chosen"] - chosen).abs() + (ref["rejected"] - rejected).abs()
            assert distance.min() < 1e-4
            index.append(int(distance.argmin()))
        return index

    rank0, rank1 = (pair_index(runs["load"](2, name, rank)["seen"]) for rank in (0, 1))
    assert len(rank0) == len(rank1) == NUM_PAIRS // 2
    assert sorted(rank0 + rank1) == list(range(NUM_PAIRS)), "the two ranks must split the data between them"
    (two,) = logged(runs["load"](2, name))
    for key, values in per_pair.items():
        assert two[key] == pytest.approx(values.mean().item(), rel=1e-5, abs=1e-6), key
        if key == "u_fraction":
            # Few pairs are in U here (rank 0 happens to hold exactly half of them), so this metric cannot tell the
            # two apart on this data; it is gathered in the same call as the per-pair values checked below.
            continue
        rank0_only = values[rank0].mean().item()
        assert abs(rank0_only - two[key]) > 1e-3, f"{key}: this data cannot tell rank-0-only logging apart"


@pytest.mark.parametrize("name", PHASE_B)
def test_training_matches_one_process(runs, name):
    single, two = logged(runs["load"](1, name)), logged(runs["load"](2, name))
    assert len(single) == len(two) == 3  # one full-dataset step per epoch
    for step, (a, b) in enumerate(zip(single, two)):
        for key in [*COMPARED, margin_metric(name), "grad_norm"]:
            if first_step_accuracy_is_roundoff(step, key, a, b):
                continue
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), f"step {step + 1}: {key}"
    assert two[-1]["loss"] < two[0]["loss"]
    one_weights = load_file(str(runs["out"][1] / f"{name}.safetensors"))
    two_weights = load_file(str(runs["out"][2] / f"{name}.safetensors"))
    start = load_file(str(runs["root"] / "policy" / "model.safetensors"))
    assert one_weights.keys() == two_weights.keys()
    moved = 0.0
    for key, value in one_weights.items():
        torch.testing.assert_close(two_weights[key], value, rtol=0, atol=2e-4, msg=key)
        if key in start:
            moved = max(moved, (value - start[key]).abs().max().item())
    assert moved > 1e-3, "training did not change the weights"
