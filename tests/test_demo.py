"""`trl-cpo demo`: a tiny end-to-end run, determinism, the corrupted reference, and the task's building blocks."""

import argparse
import json
import math

import pytest
import torch

from trl_cpo import _demo_task as task_lib
from trl_cpo import demo
from trl_cpo.reference import ReferenceLogps
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

# A few steps of everything at toy sizes: exercises the whole pipeline, not the phenomenon.
TINY_ARGS = [
    "--max_steps", "4",
    "--per_device_train_batch_size", "4",
    "--eval_every", "2",
    "--ref_steps", "8",
    "--ref_batch_size", "8",
    "--eval_pairs", "20",
    "--hidden_size", "16",
    "--num_layers", "1",
    "--num_topics", "4",
    "--seed", "3",
    "--no_progress",
]  # fmt: skip
FRACTIONS = ("accuracy", "u_fraction", "accuracy_ref_misaligned", "u_fraction_ref_misaligned")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The demo runs torch on one thread (its default); on a busy 2-core machine more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _strip_timings(value):
    if isinstance(value, dict):
        return {k: _strip_timings(v) for k, v in value.items() if k != "timing_seconds"}
    if isinstance(value, list):
        return [_strip_timings(v) for v in value]
    return value


def _check_fraction(value):
    assert value is None or (math.isfinite(value) and 0.0 <= value <= 1.0), value


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-sweep")
    assert demo.main([*TINY_ARGS, "--corruption", "0", "0.5", "--output_dir", str(out)]) == 0
    return out


def test_demo_writes_table_plots_and_json(sweep_run, capsys):
    table = (sweep_run / "table.txt").read_text()
    for expected in ("Corruption 0.00", "Corruption 0.50", "DPO", "CPO", "E-CPOC", "Across corruption ratios"):
        assert expected in table
    for name in ("curves_corruption-0.00.png", "curves_corruption-0.50.png", "sweep.png"):
        png = sweep_run / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 300_000

    output = json.loads((sweep_run / "results.json").read_text())
    assert output["config"]["max_steps"] == 4 and output["config"]["seed"] == 3
    assert [r["corruption"] for r in output["results"]] == [0.0, 0.5]
    for result in output["results"]:
        _check_fraction(result["reference"]["misaligned_rate"])
        _check_fraction(result["reference"]["accuracy"])
        assert set(result["methods"]) == {"DPO", "CPO", "E-CPOC"}
        for method in result["methods"].values():
            assert method["precompute_ref_log_probs"] is True
            assert [h["step"] for h in method["history"]] == [0, 2, 4]
            for point in method["history"]:
                for key in FRACTIONS:
                    _check_fraction(point[key])
                assert math.isfinite(point["mean_delta_pi"])
            # Step 0 is the reference itself: nothing is in U yet.
            assert method["history"][0]["u_fraction"] == 0.0
            assert method["history"][0]["accuracy"] == result["reference"]["accuracy"]
            assert all(math.isfinite(entry["loss"]) for entry in method["train_loss"])
        for name in ("DPO", "CPO", "E-CPOC"):
            assert result["methods"][name]["loss_type"] == ["sigmoid_norm"]
        assert result["methods"]["CPO"]["hyperparameters"] == {
            "beta": 2.5,
            "cpo_gamma": 0.05,
            "cpo_margin_type": "inverse_prob",
            "cpo_max_margin": 10.0,
            "loss_type": "sigmoid_norm",
        }
        assert set(result["methods"]["E-CPOC"]["hyperparameters"]) == {
            "beta",
            "ecpoc_gamma",
            "ecpoc_tau",
            "ecpoc_alpha",
            "loss_type",
        }
        assert result["methods"]["E-CPOC"]["trainer"] == "trl_cpo.ECPOCTrainer"


def test_demo_is_deterministic(sweep_run, tmp_path, capsys):
    # Same seed, run again on its own: every number of that ratio is identical (each ratio seeds everything itself,
    # so it also does not depend on what ran before it in a sweep).
    assert demo.main([*TINY_ARGS, "--corruption", "0.5", "--output_dir", str(tmp_path)]) == 0
    assert "Corruption 0.50" in capsys.readouterr().out
    again = json.loads((tmp_path / "results.json").read_text())["results"][0]
    first = json.loads((sweep_run / "results.json").read_text())["results"][1]
    assert _strip_timings(again) == _strip_timings(first)


def test_corrupted_reference_is_measurably_misaligned():
    task = task_lib.TaskConfig(num_topics=4)
    train = task_lib.make_pairs(task, 256, seed=0, label_noise=task.label_noise)
    held_out = task_lib.make_pairs(task, 80, seed=1, label_noise=0.0)
    tokenizer = build_tiny_tokenizer([" ".join(task.vocabulary())], vocab_size=200)
    rates = {}
    for ratio in (0.0, 0.5):
        corrupted = task_lib.corrupted_topics(task.num_topics, ratio, seed=0)
        assert len(corrupted) == round(ratio * task.num_topics)
        model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, max_position_embeddings=64, seed=0)
        items = [
            task_lib.encode(tokenizer, prompt, target)
            for prompt, target in task_lib.reference_sft_examples(task, train, corrupted, seed=0)
        ]
        task_lib.train_sft(
            model, items, pad_token_id=tokenizer.pad_token_id, steps=30, batch_size=32, learning_rate=1e-2, seed=0
        )
        held = demo._HeldOut(tokenizer, held_out, model)
        rates[ratio] = ((held.ref_chosen - held.ref_rejected) < 0).float().mean().item()
    assert rates[0.0] <= 0.1
    assert rates[0.5] >= 0.4
    assert rates[0.5] > rates[0.0]


def test_task_building_blocks():
    task = task_lib.TaskConfig(num_topics=10, label_noise=0.25)
    # Nested corruption sets, so a sweep corrupts more of the same reference.
    sets = [set(task_lib.corrupted_topics(10, r, seed=0)) for r in (0.0, 0.2, 0.4, 0.6)]
    assert [len(s) for s in sets] == [0, 2, 4, 6]
    assert sets[0] <= sets[1] <= sets[2] <= sets[3]

    pairs = task_lib.make_pairs(task, 400, seed=0, label_noise=task.label_noise)
    assert pairs == task_lib.make_pairs(task, 400, seed=0, label_noise=task.label_noise)
    assert 0.15 < sum(p["swapped"] for p in pairs) / len(pairs) < 0.35
    for p in pairs:
        assert p["prompt"].startswith(f"topic{p['topic']} ")
        assert (p["chosen"], p["rejected"]) == ((p["bad"], p["good"]) if p["swapped"] else (p["good"], p["bad"]))
        assert all(w.startswith(f"good{p['topic']}_") for w in p["good"].split())

    # The reference imitates the bad response on corrupted topics, with per-word noise.
    examples = task_lib.reference_sft_examples(task, pairs, corrupted=[0], seed=0)
    words = [(p["topic"], w) for p, (_, target) in zip(pairs, examples) for w in target.split()]
    bad_share = {
        t: sum(w.startswith("bad") for tt, w in words if tt == t) / sum(tt == t for tt, _ in words) for t in (0, 1)
    }
    assert bad_share[0] > 0.8 and bad_share[1] < 0.2

    tokenizer = build_tiny_tokenizer([" ".join(task.vocabulary())], vocab_size=200)
    prompt_ids, completion_ids = task_lib.encode(tokenizer, pairs[0]["prompt"], pairs[0]["chosen"])
    assert tokenizer.unk_token_id not in prompt_ids + completion_ids
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert len(completion_ids) == len(pairs[0]["chosen"].split()) + 1


def test_held_out_metrics():
    # delta_ref = [-2, -2, -2, 1]; delta_pi = [-3 (below the reference), -1 (in U), 0.5 (fixed), 2] (per token).
    ref_chosen, ref_rejected = torch.tensor([-3.0, -3.0, -3.0, -1.0]), torch.tensor([-1.0, -1.0, -1.0, -2.0])
    policy_chosen, policy_rejected = torch.tensor([-4.0, -2.0, -0.5, 0.0]), torch.tensor([-1.0, -1.0, -1.0, -2.0])
    metrics = demo.held_out_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert metrics["accuracy"] == 0.5
    assert metrics["u_fraction"] == 0.25
    assert metrics["u_fraction_ref_misaligned"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["accuracy_ref_misaligned"] == pytest.approx(1 / 3, abs=1e-6)
    clean = demo.held_out_metrics(policy_chosen[3:], policy_rejected[3:], ref_chosen[3:], ref_rejected[3:])
    assert clean["u_fraction"] == 0.0 and clean["u_fraction_ref_misaligned"] is None


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "sigmoid"])
def test_method_targets_are_the_trainers_targets(loss_type):
    # The targets the table reports, from the reference's summed log-probs and completion lengths: DPO's is
    # delta_ref; CPO's is raised by m / beta with m on per-token probabilities; E-CPOC's is at least ~ecpoc_gamma.
    lengths_chosen, lengths_rejected = torch.tensor([2.0, 3.0, 1.0, 4.0]), torch.tensor([4.0, 1.0, 2.0, 3.0])
    token_chosen, token_rejected = torch.tensor([-3.0, -3.0, -3.0, -1.0]), torch.tensor([-1.0, -1.0, -1.0, -2.0])
    reference = ReferenceLogps(
        token_chosen * lengths_chosen, token_rejected * lengths_rejected, lengths_chosen, lengths_rejected
    )
    args = demo.build_parser().parse_args([])
    config = argparse.Namespace(**vars(args), loss_type=[loss_type])
    if loss_type == "sigmoid_norm":
        delta_ref = token_chosen - token_rejected
    else:
        delta_ref = reference.chosen - reference.rejected
    dpo = demo.method_target("DPO", reference, config)
    cpo = demo.method_target("CPO", reference, config)
    ecpoc = demo.method_target("E-CPOC", reference, config)
    torch.testing.assert_close(dpo, delta_ref)
    margin = args.cpo_gamma * (torch.exp(-token_chosen) + torch.exp(-token_rejected))  # below the cap of 10 here
    torch.testing.assert_close(cpo, delta_ref + margin / args.beta)
    assert (ecpoc >= args.ecpoc_gamma).all()


def test_cli_help_and_bad_arguments(capsys):
    from trl_cpo.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    flags = ["--corruption", "--max_steps", "--per_device_train_batch_size", "--seed", "--output_dir", "--beta"]
    flags += ["--cpo_gamma", "--cpo_margin_type", "--cpo_max_margin", "--ecpoc_gamma", "--ecpoc_tau", "--ecpoc_alpha"]
    for flag in flags:
        assert flag in help_text
    for old in ("--steps ", "--batch_size ", "--tau ", "--alpha ", "--margin_type "):
        assert old not in help_text
    for bad in (["--corruption", "1.5"], ["--max_steps", "0"], ["--label_noise", "0.5"], ["--methods", "IPO"]):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(bad)
        assert exit_info.value.code == 2


def test_plots_are_skipped_without_matplotlib(sweep_run, monkeypatch, tmp_path):
    # matplotlib is an optional extra ('trl-cpo[demo]'): without it the demo still writes the table and JSON.
    results = json.loads((sweep_run / "results.json").read_text())["results"]
    monkeypatch.setattr(demo, "_pyplot", lambda: None)
    assert demo.plot_curves(results[1], str(tmp_path / "curves.png")) is False
    assert demo.plot_sweep(results, list(demo.METHODS), str(tmp_path / "sweep.png")) is False
    assert not list(tmp_path.iterdir())
