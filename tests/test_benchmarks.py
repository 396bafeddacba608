"""Benchmarks that cannot rot: every script in benchmarks/ runs its `--smoke` mode here, and the shared data loader.

Each script runs once, in a subprocess as a user would (`python benchmarks/X.py --smoke`): it must exit 0, label its
output as a smoke run, print the report's ratios (parsed here: finite and positive), print nothing about
bitsandbytes' kernel probe on stderr, and leave benchmarks/results/ alone. The scripts that read the shipped HH-RLHF
pairs must say that they skipped the one pair the trainers' validator refuses (record 86: an empty chosen answer).
`gpu_suite.py --smoke` is the session fixture that tests/test_gpu_suite.py checks in detail.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from datasets import Dataset
from helpers import REPO, load_script, subprocess_env

from trl_cpo import _bnb_log
from trl_cpo.data import validate_preference_dataset

BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"
RESULTS_BEFORE = sorted((p.name, p.stat().st_mtime_ns) for p in RESULTS.iterdir())  # before any smoke run
BANNER = "=== SMOKE RUN (--smoke): "
SKIPPED_86 = "skipped 1 of 96 pairs the trainers' validator refuses: row 86: column 'chosen' has 1 empty completion(s)"
NUMBER = r"(?:-?[0-9.]+(?:e[-+]?\d+)?|nan)"
data = load_script("benchmarks_data", BENCH / "_data.py")


def _smoke(script: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def step_time():
    return _smoke("step_time.py")


@pytest.fixture(scope="module")
def precompute_time():
    return _smoke("precompute_time.py")


@pytest.fixture(scope="module")
def one_pass_time():
    return _smoke("one_pass_time.py")


@pytest.fixture(scope="module")
def sweep_reference_time():
    return _smoke("sweep_reference_time.py")


@pytest.fixture(scope="module")
def resume_time():
    return _smoke("resume_time.py")


@pytest.fixture(scope="module")
def diagnostics_cost():
    return _smoke("diagnostics_cost.py")


def ratio(text: str, label: str) -> float:
    """The number after `label` on its line; it must be finite and positive."""
    match = re.search(rf"{re.escape(label)}\s*({NUMBER})", text)
    assert match, f"no {label!r} line in:\n{text[-3000:]}"
    value = float(match.group(1))
    assert math.isfinite(value) and value > 0, (label, value)
    return value


def assert_labelled(stdout: str):
    lines = stdout.splitlines()
    assert lines[0].startswith(BANNER) and lines[-1].startswith(BANNER), "a smoke run opens and ends with its banner"


def test_step_time_smoke(step_time):
    assert_labelled(step_time.stdout)
    assert "smoke run (not a measurement): device: CPU" in step_time.stdout
    table = rf"^(cpo|ecpoc|dpo_precomp|dpo_live) +((?:{NUMBER} +){{6}}{NUMBER})$"
    rows = dict(re.findall(table, step_time.stdout, re.M))
    assert set(rows) == {"cpo", "ecpoc", "dpo_precomp", "dpo_live"}, step_time.stdout
    for row in rows.values():
        step_s, tokens_per_s, _, time_vs_precomp, time_vs_live, mem_vs_precomp, mem_vs_live = map(float, row.split())
        assert all(math.isfinite(x) and x > 0 for x in (step_s, tokens_per_s, time_vs_precomp, time_vs_live))
        assert math.isnan(mem_vs_precomp) and math.isnan(mem_vs_live)  # in-process: no per-trainer memory claimed
    assert rows["dpo_precomp"].split()[3] == "1.000" and rows["dpo_live"].split()[4] == "1.000"


def test_precompute_time_smoke(precompute_time):
    out = precompute_time.stdout
    assert_labelled(out)
    assert SKIPPED_86 in out.splitlines()
    assert "smoke run (not a measurement): device: CPU" in out and "; 95 HH-RLHF pairs" in out
    ratio(out, "ours / trl (median of per-round ratios):")
    ratio(out, "same in process CPU time:")
    # Padded tokens, longest first / dataset order: a count, not a timing, so sorting must lower it.
    sorted_tokens, order_tokens, padded = re.search(
        r"longest first / dataset order: (\d+) / (\d+) = ([0-9.]+)", out
    ).groups()
    assert 0 < int(sorted_tokens) < int(order_tokens) and float(padded) == pytest.approx(
        int(sorted_tokens) / int(order_tokens), abs=1e-3
    )
    # Both precomputes give the same reference log-probs (different padding: round-off only).
    assert float(re.search(rf"on ref_chosen_logps: {NUMBER} \(relative ({NUMBER})\)", out).group(1)) < 1e-4


def test_one_pass_time_smoke(one_pass_time):
    out = one_pass_time.stdout
    assert_labelled(out)
    assert SKIPPED_86 in out.splitlines()
    assert "smoke run (not a measurement): 95 pairs, tiny Llama" in out
    ratio(out, "one pass / two passes (audit + training start):")
    assert re.search(r"training start, from the audit's entry +[0-9.]+ s +\(fingerprint [0-9.]+ s, no forward\)", out)


def test_sweep_reference_time_smoke(sweep_reference_time):
    out = sweep_reference_time.stdout
    assert_labelled(out)
    ours = re.search(rf"CPOTrainer, cpo_gamma .*: reference passes +{NUMBER} s +\[(.*)\]", out).group(1)
    first, *rest = (float(x) for x in ours.split(","))
    assert len(rest) == 3 and all(x < first for x in rest)  # the first run computes, the others read the store
    ratio(out, "sweep reference time, ours / TRL's:")


def test_resume_time_smoke(resume_time):
    out = resume_time.stdout
    assert_labelled(out)
    no_pass = float(re.search(r"checkpoint with its reference: +([0-9.]+) s", out).group(1))
    one_pass = float(re.search(r"reference recomputed \(one pass\): +([0-9.]+) s", out).group(1))
    assert 0 < no_pass and 0 < one_pass
    ratio(out, "resume time, no pass / one pass:")


def test_diagnostics_cost_smoke(diagnostics_cost):
    out = diagnostics_cost.stdout
    assert_labelled(out)
    assert "smoke run (not a measurement): device: CPU" in out and "alternating" in out
    ratio(out, "CPOTrainer step time, with / without the new diagnostics:")
    ratio(out, "DPOTrainer step time, with / without DiagnosticsCallback:")
    for trainer in ("cpo", "dpo"):
        assert re.search(rf"{trainer}: added time in the diagnostics' code / step time: {NUMBER}$", out, re.M)


def test_gpu_suite_smoke(gpu_suite_smoke):
    proc, _ = gpu_suite_smoke
    assert proc.returncode == 0, f"suite failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert_labelled(proc.stdout)
    assert "**CPU smoke run (--smoke): not GPU results.**" in proc.stdout  # the Markdown table, printed
    for trainer in ("cpo", "ecpoc", "dpo_precomp", "dpo_live"):
        cells = re.search(rf"^\| {trainer} \|(.*)\|$", proc.stdout, re.M).group(1).split("|")
        time_vs_precomp, time_vs_live = float(cells[3]), float(cells[4])
        assert all(math.isfinite(x) and x > 0 for x in (time_vs_precomp, time_vs_live))


@pytest.mark.parametrize(
    "script",
    [
        "step_time",
        "precompute_time",
        "one_pass_time",
        "sweep_reference_time",
        "resume_time",
        "diagnostics_cost",
        "gpu_suite",
    ],
)
def test_no_bitsandbytes_probe_noise(script, request, monkeypatch):
    fixture = request.getfixturevalue("gpu_suite_smoke" if script == "gpu_suite" else script)
    proc = fixture[0] if script == "gpu_suite" else fixture
    for notice in (_bnb_log.KERNEL_NOTICE, _bnb_log.TRUST_NOTICE):  # the probe's own records, dropped by trl_cpo
        assert notice not in proc.stdout + proc.stderr
    noisy = [line for line in proc.stderr.splitlines() if re.search("bitsandbytes|kernels|gemm_4bit", line, re.I)]
    if script == "gpu_suite":
        # Its QLoRA part holds 4-bit layers on a CPU, where trl_cpo says once what the missing kernel means.
        monkeypatch.setattr(_bnb_log, "probe_failure", "<why>")
        monkeypatch.setattr(_bnb_log, "_explained", False)
        explanation = _bnb_log.explain_once().split(_bnb_log.KERNEL_REPO)[0]
        assert sum(line.startswith(explanation) for line in noisy) <= 1
        noisy = [line for line in noisy if not line.startswith(explanation)]
    assert noisy == []


def test_smoke_runs_write_nothing_under_results(
    step_time, precompute_time, one_pass_time, sweep_reference_time, resume_time, diagnostics_cost, gpu_suite_smoke
):
    assert sorted((p.name, p.stat().st_mtime_ns) for p in RESULTS.iterdir()) == RESULTS_BEFORE


def test_smoke_refuses_an_output_under_results(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    smoke = load_script("_smoke", BENCH / "_smoke.py")
    with pytest.raises(SystemExit, match="--smoke writes no measurement"):
        smoke.refuse_results_dir(RESULTS / "step_time_smoke.json")
    smoke.refuse_results_dir(tmp_path / "step_time_smoke.json")
    smoke.refuse_results_dir(None)
    suite = load_script("gpu_suite", BENCH / "gpu_suite.py")
    assert suite._parse(["--tiny"]).smoke and suite._parse(["--smoke"]).smoke  # --tiny: the old name, kept


def test_step_time_child_flags_round_trip(monkeypatch):
    """--smoke runs the trainers in-process; what a measurement passes to each child process must parse back."""
    monkeypatch.syspath_prepend(str(BENCH))
    st = load_script("step_time", BENCH / "step_time.py")
    args = st._parse(["--smoke", "--shape", "small", "--rounds", "2", "--load_in_4bit", "--lora", "--json", "x"])
    child = st._parse([*st._child_flags(args), "--child", "cpo", "--workdir", "w"])
    assert {**vars(child), "child": None, "workdir": None, "json": "x"} == vars(args)


# -- the shared loader (benchmarks/_data.py) ------------------------------------------------------------------------


def test_loader_skips_exactly_what_the_validator_refuses(tmp_path):
    records = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"},  # empty chosen
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},  # not one dialogue
        {"prompt": "Q:", "chosen": " yes", "rejected": "   "},  # blank rejected
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(map(json.dumps, records)) + "\n\n")
    loaded = data.load_pairs(path)
    assert loaded.read == 5 and loaded.not_pairs == [2]
    assert [row for row, _ in loaded.refused] == [1, 3]
    for row, reason in loaded.refused:  # each one the validator refuses on its own, in its words
        with pytest.raises(ValueError, match=re.escape(reason)):
            validate_preference_dataset(Dataset.from_list([data.as_pair(records[row])]))
    assert loaded.pairs == [data.as_pair(records[0]), data.as_pair(records[4])]
    assert loaded.summary().splitlines() == [
        "skipped 2 of 5 pairs the trainers' validator refuses: row 1: column 'chosen' has 1 empty completion(s); "
        "row 3: column 'rejected' has 1 empty completion(s)",
        f"skipped 1 of 5 records: {data.NOT_A_PAIR} (rows 2)",
    ]
    assert data.load_pairs(path, limit=1).summary().startswith("all 1 pairs pass the trainers' validator")


def test_loader_on_the_shipped_file():
    loaded = data.load_pairs()
    assert (loaded.read, len(loaded.pairs), loaded.not_pairs) == (512, 511, [])
    assert loaded.summary() == (
        "skipped 1 of 512 pairs the trainers' validator refuses: row 86: column 'chosen' has 1 empty completion(s)"
    )


def test_loader_refuses_a_set_refused_as_a_whole(tmp_path, monkeypatch):
    """A refusal that no single pair causes (none of today's checks: a validator that refuses any two pairs)."""
    import trl_cpo.data

    def refuses_two_or_more(dataset, name):
        if len(dataset) > 1:
            raise ValueError(f"{name}: more than one pair")

    monkeypatch.setattr(trl_cpo.data, "validate_preference_dataset", refuses_two_or_more)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "Q:", "chosen": " yes", "rejected": " no"}) for _ in range(3)))
    with pytest.raises(ValueError, match="refused as a whole, not pair by pair: pairs: more than one pair"):
        data.load_pairs(path)
