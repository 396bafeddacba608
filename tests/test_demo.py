"""`trl-cpo demo`: a tiny multi-seed run and its results.json, the intervals, the predicted optimum against a direct
minimisation, up-front validation, the output folder, and the task's building blocks."""

import json
import math
import os

import pytest
import torch

from trl_cpo.reference import ReferenceLogps
from trl_cpo.scripts.demo import args as demo_args
from trl_cpo.scripts.demo import measure, optimum, plots, report, rows, run, stats
from trl_cpo.scripts.demo import task as task_lib
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

# A few steps of everything at toy sizes: exercises the whole pipeline, not the phenomenon.
TINY_ARGS = [
    "--max_steps", "4",
    "--per_device_train_batch_size", "4",
    "--eval_every", "2",
    "--ref_steps", "8",
    "--ref_batch_size", "8",
    "--train_pairs", "48",
    "--eval_pairs", "24",
    "--hidden_size", "16",
    "--num_layers", "1",
    "--num_topics", "4",
    "--disable_tqdm",
]  # fmt: skip
ROWS = list(rows.ROWS)
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
def seeds_run(tmp_path_factory):
    """Every row, two seeds, one ratio; records each results.json write and what was printed before the files."""
    out = tmp_path_factory.mktemp("demo-seeds")
    writes, printed_before_files = [], {}
    write_json, finish = report.write_json, report.finish

    def recording_write(path, output):
        writes.append(json.loads(json.dumps(output)))
        write_json(path, output)

    def recording_finish(output, args):
        printed_before_files["table.txt existed"] = (out / "table.txt").exists()
        finish(output, args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_json", recording_write)
        patch.setattr(report, "finish", recording_finish)
        assert (
            run.main([*TINY_ARGS, "--corruption", "0.5", "--seeds", "2", "--seed", "3", "--output_dir", str(out)]) == 0
        )
    return out, writes, printed_before_files


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-sweep")
    argv = [*TINY_ARGS, "--corruption", "0", "0.5", "--seeds", "1", "--seed", "3", "--methods", "DPO", "E-CPOC"]
    assert run.main([*argv, "--output_dir", str(out)]) == 0
    return out


def test_results_json_schema(seeds_run):
    out, _, _ = seeds_run
    output = json.loads((out / "results.json").read_text())
    assert output["schema_version"] == report.SCHEMA_VERSION and output["complete"] is True
    assert output["interval"].startswith("95% Student-t interval over seeds")
    assert output["config"]["seeds"] == 2 and output["config"]["seed"] == 3 and output["config"]["methods"] == ROWS
    assert set(output["rows"]) == set(ROWS)
    assert output["rows"]["CPO-auto"]["cpo_auto_gamma"] == 0.9
    assert output["rows"]["CPO-inverse_logp"]["cpo_margin_type"] == "inverse_logp"
    assert output["rows"]["CPO"]["cpo_margin_type"] == "inverse_prob"
    (entry,) = output["results"]
    assert entry["corruption"] == 0.5 and [s["seed"] for s in entry["seeds"]] == [3, 4]
    for seed in entry["seeds"]:
        _check_fraction(seed["reference"]["misaligned_rate"])
        assert set(seed["methods"]) == set(ROWS)
        for name, row in seed["methods"].items():
            assert row["precompute_ref_log_probs"] is True
            assert row["hyperparameters"]["loss_type"] == ["sigmoid_norm"]
            assert [h["step"] for h in row["history"]] == [0, 2, 4]
            for point in row["history"]:
                for key in FRACTIONS:
                    _check_fraction(point[key])
            # Step 0 is the reference itself: nothing is in U yet.
            assert row["history"][0]["u_fraction"] == 0.0
            assert row["history"][0]["accuracy"] == seed["reference"]["accuracy"]
            final = row["final"]
            finite = ("mean_target_ref_misaligned", "predicted_mean_delta_pi", "mean_delta_pi_ref_misaligned")
            for key in (*finite, "gap_to_predicted_ref_misaligned", "spread_around_predicted_ref_misaligned"):
                assert math.isfinite(final[key]), (name, key)
            assert ("cpo_gamma" in final) == name.startswith("CPO")
        assert seed["methods"]["DPO"]["trainer"] == "trl.DPOTrainer"
        assert seed["methods"]["E-CPOC"]["trainer"] == "trl_cpo.ECPOCTrainer"
        assert seed["methods"]["DPO"]["reference_report"] is None
        # The CPO trainers' own reference report; CPO-auto's cpo_gamma is the one recommend_cpo_gamma gave it.
        cpo_report = seed["methods"]["CPO"]["reference_report"]
        assert seed["methods"]["CPO"]["printed_report"].startswith("Reference report (CPO)")
        assert seed["methods"]["CPO-auto"]["final"]["cpo_gamma"] == pytest.approx(
            cpo_report["recommended_cpo_gamma"], abs=1e-6
        )
        assert seed["methods"]["CPO"]["final"]["cpo_gamma"] == 0.05
        # DPO's predicted optimum is closed-form: delta_ref + logit(1 - q) / beta on every pair.
        logit = math.log(0.8 / 0.2)
        assert seed["methods"]["DPO"]["final"]["predicted_mean_delta_pi_ref_misaligned"] == pytest.approx(
            seed["reference"]["mean_delta_ref_misaligned"] + logit / 2.5, abs=1e-5
        )
    # The summary: each number's interval over the seeds' values.
    summary = entry["summary"]
    assert summary["seeds"] == [3, 4]
    for name in ROWS:
        for key in (
            "accuracy",
            "u_fraction",
            "mean_delta_pi_ref_misaligned",
            "predicted_mean_delta_pi_ref_misaligned",
        ):
            values = [s["methods"][name]["final"][key] for s in entry["seeds"]]
            assert summary["methods"][name][key] == stats.t_interval(values)
    assert summary["reference_report"]["row"] == "CPO"
    assert summary["reference_report"]["misaligned_fraction"]["n"] == 2


def test_results_written_as_they_come_and_table_before_files(seeds_run, capsys):
    out, writes, printed_before_files = seeds_run
    # One write per finished row and seed, then the final one.
    assert len(writes) == 2 * len(ROWS) + 1
    assert writes[0]["complete"] is False and list(writes[0]["results"][0]["seeds"][0]["methods"]) == ["DPO"]
    assert [len(w["results"][0]["seeds"]) for w in writes[: len(ROWS) + 1]] == [1] * len(ROWS) + [2]
    assert writes[-1]["complete"] is True
    assert printed_before_files == {"table.txt existed": False}
    table = (out / "table.txt").read_text()
    for expected in ("Corruption 0.50, seeds 3, 4", "predicted", "Reference report (CPO)", "± "):
        assert expected in table
    for name in ROWS:
        assert f"\n{name} " in table
    png = out / "curves_corruption-0.50.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000


def test_table_is_printed_before_any_file_is_written(seeds_run, tmp_path, monkeypatch, capsys):
    # A failure while writing (here: the plot) cannot lose the table: it is on stdout first.
    out, _, _ = seeds_run
    output = json.loads((out / "results.json").read_text())
    args = demo_args.DemoArguments(**{**output["config"], "output_dir": str(tmp_path)})

    def broken_plot(*_):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plot_curves", broken_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.finish(output, args)
    assert "predicted" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()


def test_sweep_and_determinism(seeds_run, sweep_run):
    out, _, _ = seeds_run
    table = (sweep_run / "table.txt").read_text()
    assert "Corruption 0.00" in table and "Across corruption ratios" in table
    assert (sweep_run / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads((sweep_run / "results.json").read_text())["results"]
    # Corrupting half the topics makes the (tiny, undertrained) reference wrong on more held-out pairs.
    rates = [entry["seeds"][0]["reference"]["misaligned_rate"] for entry in sweep]
    assert rates[0] < rates[1]
    # Same seed, same machine: the sweep's (0.5, seed 3) rows equal the multi-seed run's, number for number (each
    # ratio and seed seeds everything itself, whatever ran before it).
    first = json.loads((out / "results.json").read_text())["results"][0]["seeds"][0]
    again = sweep[1]["seeds"][0]
    assert _strip_timings(again["reference"]) == _strip_timings(first["reference"])
    for name in ("DPO", "E-CPOC"):
        assert _strip_timings(again["methods"][name]) == _strip_timings(first["methods"][name])


# -- intervals -------------------------------------------------------------------------------------------------------


def test_t_quantile_and_interval():
    # Two-sided 95% Student-t critical values (standard tables).
    for df, expected in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)]:
        assert stats.t_quantile(df) == pytest.approx(expected, abs=1e-4)
    assert stats.t_quantile(2, 0.9) == pytest.approx(2.9200, abs=1e-4)
    interval = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert interval == {
        "mean": 2.0,
        "low": pytest.approx(2 - half, abs=1e-5),
        "high": pytest.approx(2 + half, abs=1e-5),
        "n": 3,
    }
    assert stats.t_interval([0.6, 0.6, 0.6]) == {"mean": 0.6, "low": 0.6, "high": 0.6, "n": 3}
    assert stats.t_interval([0.25]) == {"mean": 0.25, "low": None, "high": None, "n": 1}
    assert stats.t_interval([None, 1.0, None, 3.0])["n"] == 2
    assert stats.t_interval([None]) is None
    assert report.fmt(stats.t_interval([1.0, 2.0, 3.0])) == f"2.000 ± {half:.3f}"
    assert report.fmt(stats.t_interval([0.5, 0.5]), 1, percent=True) == "50.0 ± 0.0%"
    assert report.fmt(None) == "-"
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0)


# -- predicted optimum -----------------------------------------------------------------------------------------------


def _numerical_minimum(t1, t2, beta, q):
    # Direct minimisation of the expected loss: a fine grid, then the grid around the best point, finer.
    grid = torch.linspace(-30, 30, 60_001, dtype=torch.float64)
    for _ in range(3):
        losses = optimum.expected_loss(
            grid,
            torch.tensor(t1, dtype=torch.float64),
            torch.tensor(t2, dtype=torch.float64),
            beta=beta,
            label_noise=q,
        )
        best = grid[losses.argmin()]
        step = (grid[1] - grid[0]).item()
        grid = torch.linspace(best - 2 * step, best + 2 * step, 2001, dtype=torch.float64)
    return best.item()


@pytest.mark.parametrize(
    "t1,t2,beta,q",
    [
        (-1.8, 1.8, 2.5, 0.2),  # DPO (t2 = -t1)
        (-1.3, 2.3, 2.5, 0.2),  # CPO (t1 + t2 = 2 m / beta)
        (0.5, 1.85, 2.5, 0.2),  # E-CPOC on a misaligned pair
        (2.0, -1.5, 0.1, 0.3),  # summed-log-prob scale beta
        (-4.0, -3.0, 5.0, 0.05),  # CPO inverse_logp: negative margin
        (1.0, 1.0, 1.0, 0.45),
    ],
)
def test_population_optimum_matches_a_direct_minimisation(t1, t2, beta, q):
    closed = optimum.population_optimum(torch.tensor([t1]), torch.tensor([t2]), beta=beta, label_noise=q).item()
    assert closed == pytest.approx(_numerical_minimum(t1, t2, beta, q), abs=1e-4)
    residual = optimum.optimality_residual(
        torch.tensor([closed]), torch.tensor([t1]), torch.tensor([t2]), beta=beta, label_noise=q
    )
    assert abs(residual.item()) < 1e-5


def test_population_optimum_special_cases_and_the_issue_numbers():
    delta_ref = torch.tensor([-1.788078, 0.5, 2.0])
    # DPO: delta_ref + logit(1 - q) / beta.
    dpo = optimum.population_optimum(delta_ref, -delta_ref, beta=2.5, label_noise=0.2)
    torch.testing.assert_close(dpo, delta_ref + math.log(4) / 2.5)
    # No label noise: no finite optimum.
    assert optimum.population_optimum(delta_ref, -delta_ref, beta=2.5, label_noise=0.0) is None
    with pytest.raises(ValueError, match="label_noise"):
        optimum.population_optimum(delta_ref, -delta_ref, beta=2.5, label_noise=1.0)
    # The numbers of the issue, from the earlier default run's means at corruption 0.4 (mean delta_ref -1.788 on the
    # misaligned pairs, CPO's mean target -1.290, E-CPOC at ecpoc_gamma 0.5, tau 2, alpha 1): DPO -1.23 (measured
    # -1.27), CPO -0.84 (-0.85), E-CPOC 0.95 (0.98).
    r = torch.tensor([-1.788078])
    m_over_beta = -1.290286 - r
    cpo = optimum.population_optimum(r + m_over_beta, -r + m_over_beta, beta=2.5, label_noise=0.2)
    from trl_cpo.losses import ecpoc_target

    zero = torch.zeros(1)
    ecpoc = optimum.population_optimum(
        ecpoc_target(r, zero, gamma=0.5, tau=2.0, alpha=1.0),
        ecpoc_target(-r, zero, gamma=0.5, tau=2.0, alpha=1.0),
        beta=2.5,
        label_noise=0.2,
    )
    assert round(dpo[0].item(), 2) == -1.23
    assert round(cpo.item(), 2) == -0.84
    assert round(ecpoc.item(), 2) == 0.95


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "sigmoid"])
def test_row_targets_are_the_trainers_targets(loss_type):
    # The targets the table reports, from the reference's summed log-probs and completion lengths: DPO's is
    # delta_ref; CPO's is raised by m / beta with m on per-token probabilities; E-CPOC's is at least ~ecpoc_gamma.
    lengths_chosen, lengths_rejected = torch.tensor([2.0, 3.0, 1.0, 4.0]), torch.tensor([4.0, 1.0, 2.0, 3.0])
    token_chosen, token_rejected = torch.tensor([-3.0, -3.0, -3.0, -1.0]), torch.tensor([-1.0, -1.0, -1.0, -2.0])
    reference = ReferenceLogps(
        token_chosen * lengths_chosen, token_rejected * lengths_rejected, lengths_chosen, lengths_rejected
    )
    args = demo_args.DemoArguments()
    configs = {name: rows.build_config(name, args, seed=0, output_dir="unused") for name in ROWS}
    for config in configs.values():
        config.loss_type = [loss_type]
    delta_ref = token_chosen - token_rejected if loss_type == "sigmoid_norm" else reference.chosen - reference.rejected
    torch.testing.assert_close(rows.row_target("DPO", reference, configs["DPO"]), delta_ref)
    margin = 0.05 * (torch.exp(-token_chosen) + torch.exp(-token_rejected))  # below the cap of 10 here
    torch.testing.assert_close(rows.row_target("CPO", reference, configs["CPO"]), delta_ref + margin / 2.5)
    logp_margin = 0.05 * (1 / token_chosen + 1 / token_rejected)  # the released numerics: negative
    torch.testing.assert_close(
        rows.row_target("CPO-inverse_logp", reference, configs["CPO-inverse_logp"]), delta_ref + logp_margin / 2.5
    )
    assert (rows.row_target("E-CPOC", reference, configs["E-CPOC"]) >= 0.5).all()
    # The flipped pair's target is the same function of the swapped reference: DPO's is -delta_ref, CPO's margin
    # is symmetric.
    torch.testing.assert_close(rows.row_target("DPO", rows.swapped(reference), configs["DPO"]), -delta_ref)
    torch.testing.assert_close(
        rows.row_target("CPO", rows.swapped(reference), configs["CPO"]), -delta_ref + margin / 2.5
    )


# -- arguments, validation, output folder ----------------------------------------------------------------------------


@pytest.fixture
def nothing_trains(monkeypatch):
    """Record every reference SFT and every trainer construction (none may happen)."""
    calls = []
    monkeypatch.setattr(task_lib, "train_sft", lambda *a, **k: calls.append("sft"))
    monkeypatch.setattr(run, "make_trainer", lambda name, *a, **k: calls.append(name))
    return calls


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--ecpoc_tau", "0"], "ecpoc_tau"),
        (["--beta", "-1"], "--beta"),
        (["--cpo_max_margin", "0"], "cpo_max_margin"),
        (["--cpo_auto_gamma", "1.5"], "cpo_auto_gamma"),
        (["--ecpoc_alpha", "-1"], "ecpoc_alpha"),
        (["--seeds", "0"], "--seeds"),
        (["--corruption", "1.5"], "--corruption"),
        (["--corruption", "0.2", "0.2"], "--corruption"),
        (["--label_noise", "0.5"], "--label_noise"),
        (["--hidden_size", "30"], "--hidden_size"),
        (["--seed", "-1"], "--seed"),
        (["--learning_rate", "inf"], "--learning_rate"),
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--ref_learning_rate", "inf"], "--ref_learning_rate"),
        # Method settings are checked whether or not a row that uses them runs.
        (["--methods", "DPO", "--cpo_gamma", "-1"], "--cpo_gamma"),
        (["--methods", "DPO", "--cpo_max_margin", "inf"], "--cpo_max_margin"),
        (["--methods", "DPO", "--cpo_auto_gamma", "0"], "--cpo_auto_gamma"),
        (["--methods", "DPO", "--ecpoc_tau", "0"], "--ecpoc_tau"),
        (["--methods", "DPO", "--ecpoc_alpha", "nan"], "--ecpoc_alpha"),
        (["--methods", "DPO", "--ecpoc_gamma", "-0.5"], "--ecpoc_gamma"),
    ],
)
def test_a_bad_flag_fails_before_anything_trains(bad, message, nothing_trains, tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main([*bad, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trl-cpo demo: error:") and message in err and "\n" not in err
    assert nothing_trains == [] and not out.exists()


def test_unknown_choice_and_unknown_flag_exit_2(nothing_trains, capsys):
    for bad, message in ((["--methods", "IPO"], "invalid choice: 'IPO'"), (["--gamma", "0.1"], "--gamma")):
        assert run.main(bad) == 2
        assert message in capsys.readouterr().err
    assert nothing_trains == []


def test_output_folder_refused_or_cleaned(nothing_trains, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    for name in ("results.json", "table.txt", "curves_corruption-0.40.png", "sweep.png", "notes.md"):
        (out / name).write_text("old")
    # Refused, before anything trains, naming the flag that allows it.
    assert run.main(["--output_dir", str(out)]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert nothing_trains == [] and (out / "results.json").exists()
    # A file where the folder should be.
    assert run.main(["--output_dir", str(out / "notes.md")]) == 2
    assert "is a file" in capsys.readouterr().err
    # --overwrite_output_dir deletes the demo's own outputs only.
    removed = demo_args.prepare_output_dir(str(out), overwrite=True)
    assert removed == ["curves_corruption-0.40.png", "results.json", "sweep.png", "table.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["keep", "notes.md"]
    # An empty or missing folder is fine.
    assert demo_args.prepare_output_dir(str(tmp_path / "new"), overwrite=False) == []


def test_a_failed_run_leaves_no_results_that_block_the_next(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def fails_after_one_row(ratio, seed, args, configs, work_dir, on_row=None):
        on_row({"seed": seed, "methods": {}})  # results.json now holds this row, "complete": false
        assert json.loads((out / "results.json").read_text())["complete"] is False
        raise RuntimeError("the second row diverged")

    monkeypatch.setattr(run, "run_seed", fails_after_one_row)
    argv = [*TINY_ARGS, "--methods", "DPO", "--seeds", "1", "--output_dir", str(out)]
    with pytest.raises(RuntimeError, match="diverged"):
        run.main(argv)
    assert not out.exists() or os.listdir(out) == []
    assert "removed its partial results.json" in capsys.readouterr().err
    assert demo_args.prepare_output_dir(str(out), overwrite=False) == []  # the next run is not blocked


def test_an_interrupted_run_keeps_its_partial_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(ratio, seed, args, configs, work_dir, on_row=None):
        on_row({"seed": seed, "methods": {}})
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_seed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.main([*TINY_ARGS, "--methods", "DPO", "--seeds", "1", "--output_dir", str(out)])
    assert json.loads((out / "results.json").read_text())["complete"] is False
    assert "--overwrite_output_dir" in capsys.readouterr().err


def test_the_demo_never_writes_over_its_config(nothing_trains, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    config = out / "table.txt"  # a YAML file, named as one of the demo's outputs
    config.write_text("seeds: 1\n")
    for overwrite in ([], ["--overwrite_output_dir"]):
        assert run.main(["--config", str(config), "--output_dir", str(out), *overwrite]) == 2
        err = capsys.readouterr().err
        assert "--config" in err and str(config) in err and "never" in err, err
    assert config.read_text() == "seeds: 1\n" and nothing_trains == []


def test_config_yaml_and_help(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("seeds: 5\ncorruption: [0.2, 0.6]\necpoc_tau: 4.0\nmethods: [DPO, E-CPOC]\n")
    args = run._parse(["--config", str(config), "--seeds", "2"])
    assert (args.seeds, args.corruption, args.ecpoc_tau, args.methods) == (2, [0.2, 0.6], 4.0, ["DPO", "E-CPOC"])
    assert args.seed_list == [0, 1]

    from trl_cpo.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--seeds", "--corruption", "--methods", "--overwrite_output_dir", "--cpo_gamma", "--cpo_auto_gamma"):
        assert flag in help_text
    assert "--cpo_margin_type" not in help_text  # the rows fix it: CPO and CPO-inverse_logp


# -- without matplotlib ----------------------------------------------------------------------------------------------


def test_plots_are_skipped_without_matplotlib(seeds_run, monkeypatch, tmp_path, capsys):
    # matplotlib is the optional [plots] extra: without it the demo still writes the table and JSON.
    out, _, _ = seeds_run
    output = json.loads((out / "results.json").read_text())
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    assert plots.plot_curves(output["results"][0], str(tmp_path / "curves.png")) is False
    args = demo_args.DemoArguments(**{**output["config"], "output_dir": str(tmp_path)})
    report.finish(output, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.txt"]
    assert "pip install 'trl-cpo[plots]'" in capsys.readouterr().err


# -- the task --------------------------------------------------------------------------------------------------------


def test_demo_logps_equal_the_trainers_precompute(tmp_path):
    # The held-out measurement computes log-probs as TRL does: on the same pairs, the demo's summed log-probs and
    # lengths equal CPOTrainer's own reference precompute.
    from datasets import Dataset

    task = task_lib.TaskConfig(num_topics=3)
    pairs = task_lib.make_pairs(task, 12, seed=0, label_noise=0.2)
    tokenizer = build_tiny_tokenizer([" ".join(task.vocabulary())], vocab_size=100)
    model = build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, max_position_embeddings=64, seed=0)
    args = demo_args.DemoArguments(per_device_train_batch_size=4, methods=["CPO"])
    config = rows.build_config("CPO", args, seed=0, output_dir=str(tmp_path))
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    with run._quiet(1, progress=False):
        trainer = rows.make_trainer("CPO", model, config, dataset, tokenizer)
    held_out = measure.HeldOut(tokenizer, pairs, model)
    theirs = trainer.train_reference_logps
    torch.testing.assert_close(held_out.reference.chosen, theirs.chosen, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(held_out.reference.rejected, theirs.rejected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(held_out.reference.chosen_lengths, theirs.chosen_lengths)


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
        held = measure.HeldOut(tokenizer, held_out, model)
        rates[ratio] = held.misaligned.float().mean().item()
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
    metrics = measure.held_out_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert metrics["accuracy"] == 0.5
    assert metrics["u_fraction"] == 0.25
    assert metrics["u_fraction_ref_misaligned"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["accuracy_ref_misaligned"] == pytest.approx(1 / 3, abs=1e-6)
    clean = measure.held_out_metrics(policy_chosen[3:], policy_rejected[3:], ref_chosen[3:], ref_rejected[3:])
    assert clean["u_fraction"] == 0.0 and clean["u_fraction_ref_misaligned"] is None
