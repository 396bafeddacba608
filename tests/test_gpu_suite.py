"""`benchmarks/gpu_suite.py --smoke`: the GPU suite's code paths on CPU, labelled as a CPU smoke run.

Runs the suite in a subprocess, as CI and a user would (the session fixture `gpu_suite_smoke`, shared with
tests/test_benchmarks.py), and checks its one JSON and its Markdown: the schema, the labelling (never presented as GPU
results), that every part is recorded, that the parts which can run on CPU ran and passed (the step-time comparison in
fp32, the QLoRA every-LoRA-weight-moves check on bitsandbytes' CPU 4-bit path), and that the CUDA-only parts say
"skipped: needs CUDA" instead of being missing.
"""

from __future__ import annotations

import json
import math

import pytest

PARTS = {"step_time", "step_time_qlora", "qlora_lora_weights_move", "recipe_fsdp2", "recipe_zero3"}
CUDA_ONLY = {"step_time_qlora", "recipe_fsdp2", "recipe_zero3"}
TRAINERS = {"cpo", "ecpoc", "cpo_live", "dpo_precomp", "dpo_live"}


@pytest.fixture(scope="module")
def suite(gpu_suite_smoke):
    proc, out = gpu_suite_smoke
    assert proc.returncode == 0, f"suite failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def test_labelled_as_cpu_smoke_run(suite):
    result, table = suite
    assert result["kind"] == "cpu_smoke" and result["device"] == "cpu"
    assert result["label"] == "CPU smoke run (--smoke): not GPU results"
    assert result["device_name"].startswith("CPU")
    assert all(part["kind"] == "cpu_smoke" for part in result["parts"].values())
    assert result["versions"]["torch"] and result["versions"]["trl"] and result["date"]
    assert table.splitlines()[2].startswith("**CPU smoke run (--smoke): not GPU results.**")
    # Every numeric column of the step-time table says it is a CPU smoke value.
    header = next(line for line in table.splitlines() if line.startswith("| trainer |"))
    assert header.count("(CPU smoke)") == 7
    assert "GPU results" not in table.replace("not GPU results", "")


def test_every_part_recorded(suite):
    result, table = suite
    assert set(result["parts"]) == PARTS
    for name in PARTS:
        assert f"| {name} |" in table
    for name in CUDA_ONLY:
        part = result["parts"][name]
        assert part["status"] == "skipped" and part["reason"].startswith("needs CUDA"), (name, part)
        assert f"| {name} | skipped: needs CUDA" in table


def test_step_time_ran_on_cpu(suite):
    result, table = suite
    part = result["parts"]["step_time"]
    assert part["status"] == "passed", part.get("error")
    assert part["config"]["dtype"] == "fp32" and part["config"]["shape"] == "tiny"
    assert set(part["trainers"]) == TRAINERS
    for name, numbers in part["trainers"].items():
        assert numbers["median_step_s"] > 0 and math.isfinite(numbers["tokens_per_s"]) and numbers["tokens_per_s"] > 0
        assert numbers["mem_vs_dpo_precomp"] is None  # in-process memory is not per trainer: no ratio is claimed
        assert len(part["runs"][name]) == 1 and len(part["runs"][name][0]["step_times"]) == 2
    assert part["trainers"]["dpo_precomp"]["time_vs_dpo_precomp"] == pytest.approx(1.0)
    assert "| cpo |" in table and "| dpo_live |" in table


def test_qlora_every_lora_weight_moves_on_cpu(suite):
    result, _ = suite
    part = result["parts"]["qlora_lora_weights_move"]
    assert part["status"] == "passed", part
    assert part["linear4bit_modules"] > 0  # the base really was 4-bit
    # 2 layers x 7 linear layers x (lora_A, lora_B)
    assert part["lora_tensors"] == part["lora_tensors_moved"] == 28
    assert part["lora_tensors_not_moved"] == [] and part["base_tensors_changed"] == []
    assert len(part["losses"]) == part["config"]["steps"]
