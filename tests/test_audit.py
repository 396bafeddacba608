"""`trl-cpo audit` on a tiny local model: the same numbers as a training run, both log-prob spaces, the verdict's
branches, every user error as one line before anything loads, and the one reference pass shared with training."""

import json
import os

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict, load_dataset
from helpers import WORDS, logp_by_hand, spaced_pairs

import trl_cpo.precompute as precompute
from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.reference import ReferenceLogps
from trl_cpo.reference_store import read_reference_logps
from trl_cpo.report import ReferenceReport, reference_report, wilson_interval
from trl_cpo.scripts import audit
from trl_cpo.scripts.audit import analysis, data, plots, score
from trl_cpo.scripts.audit.args import PAIRS_FILE, PLOT_FILE, REPORT_FILE, AuditError
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

#: Training settings shared by the YAML the audit reads and the CPOConfig of the training run it is compared with.
TRAIN = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    per_device_train_batch_size=4,
    max_length=10,  # truncates some pairs: the audit must truncate as training does
    report_to="none",
    beta=2.5,
    loss_type=["sigmoid_norm"],
    seed=0,
)
#: Method fields, in one place.
CPO_FIELDS = dict(cpo_gamma=0.05)
NUM_PAIRS = 24


def save_model(path, seed):
    tokenizer = build_tiny_tokenizer(WORDS)
    build_tiny_llama(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    rows = spaced_pairs(NUM_PAIRS)
    data_file = root / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = save_model(root / "model", seed=3)
    config = {
        "model_name_or_path": model_dir,
        "dataset_name": str(data_file),
        "output_dir": str(root / "run"),
        "method": "cpo",
        # The training YAML names the file: the audit writes it there, training reads it from there.
        "reference_logps_file": str(root / "shared" / "reference_logps.safetensors"),
        "model_card_dataset_name": "pairs",  # a train-script-only key: accepted
        **TRAIN,
        **CPO_FIELDS,
    }
    config_file = root / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return {"root": root, "rows": rows, "data": str(data_file), "model": model_dir, "yaml": str(config_file), **config}


@pytest.fixture(scope="module")
def audited(workspace):
    """One audit of the training YAML; its audit.json and pairs.jsonl."""
    assert audit.main(["--config", workspace["yaml"]]) == 0
    out = workspace["output_dir"]
    with open(os.path.join(out, REPORT_FILE)) as f:
        report = json.load(f)
    with open(os.path.join(out, PAIRS_FILE)) as f:
        pairs = [json.loads(line) for line in f]
    return report, pairs


def train_dataset(workspace):
    return load_dataset("json", data_files=workspace["data"], split="train")


def cpo_trainer(workspace, tmp_path, dataset=None, model=None, peft_config=None, **overrides):
    args = CPOConfig(
        output_dir=str(tmp_path / "trainer"),
        # What the train script passes (ModelConfig's defaults).
        model_init_kwargs=dict(revision="main", trust_remote_code=False, attn_implementation=None, dtype="float32"),
        **{**TRAIN, **CPO_FIELDS, **overrides},
    )
    dataset = dataset or train_dataset(workspace)
    return CPOTrainer(model=model or workspace["model"], args=args, train_dataset=dataset, peft_config=peft_config)


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """A CPO training run's trainer on the same model, data and settings (its precompute ran)."""
    trainer = cpo_trainer(workspace, tmp_path_factory.mktemp("train"))
    trainer.precompute_reference()  # what train() runs first
    return trainer


# -- same numbers as training ------------------------------------------------------------------------------------------


def test_audit_report_equals_the_trainers(audited, trained):
    report, _ = audited
    logs = trained.reference_report.to_logs(prefix="")
    assert set(logs) >= {"misaligned_fraction", "misaligned_fraction_ci_low", "lifted_fraction", "cpo_gamma"}
    for name in ReferenceReport.LOGGED_KEYS:
        # To the last digit: same function, same log-probs, same config. Fields that do not apply are null.
        assert report[name] == logs.get(name), name
    assert report["delta_ref_quantiles"] == trained.reference_report.delta_ref_quantiles
    assert report["num_pairs"] == len(trained.train_dataset)
    assert report["schema_version"] == 1


def test_pairs_are_trl_tokenized_truncated_and_scored(audited, workspace, trained):
    report, pairs = audited
    reference = trained.train_reference_logps
    assert [p["chosen_logp"] for p in pairs] == reference.chosen.tolist()
    assert [p["rejected_tokens"] for p in pairs] == reference.rejected_lengths.long().tolist()
    assert report["num_pairs_truncated"] > 0  # max_length=12 bites: the comparison covers truncation
    # Untruncated pairs also match log-probs computed from the model's logits, without TRL.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workspace["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace["model"])
    checked = 0
    for pair in pairs:
        row = workspace["rows"][pair["row"]]
        logp, length = logp_by_hand(model, tokenizer, row["prompt"], row["chosen"])
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        if prompt + max(length, pair["rejected_tokens"]) <= TRAIN["max_length"]:
            assert pair["chosen_logp"] == pytest.approx(logp, abs=1e-4)
            assert pair["chosen_tokens"] == length
            checked += 1
    assert checked >= 5


def test_wilson_interval_and_the_reports_intervals(audited):
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    report, _ = audited
    for space in ("summed", "per_token"):
        summary = report["spaces"][space]
        k = summary["num_misaligned"]
        assert (summary["misaligned_fraction_ci_low"], summary["misaligned_fraction_ci_high"]) == wilson_interval(
            k, report["num_pairs"]
        )
    assert report["spaces"]["per_token"]["misaligned_fraction"] == report["misaligned_fraction"]  # the loss's space


def test_both_spaces_and_the_sign_cross_tab(audited):
    report, pairs = audited
    summed = torch.tensor([p["delta_ref_summed"] for p in pairs])
    per_token = torch.tensor([p["delta_ref_per_token"] for p in pairs])
    table = report["sign_crosstab"]
    assert table == analysis.sign_crosstab(summed, per_token)
    assert sum(sum(row.values()) for row in table.values()) == len(pairs)
    negative_summed = sum(table["summed_negative"].values())
    negative_per_token = sum(row["per_token_negative"] for row in table.values())
    assert negative_summed == report["spaces"]["summed"]["num_misaligned"] == int((summed < 0).sum())
    assert negative_per_token == report["spaces"]["per_token"]["num_misaligned"]
    changed = (torch.sign(summed) != torch.sign(per_token)).float().mean().item()
    assert report["sign_differs_fraction"] == pytest.approx(changed)
    assert changed > 0  # pairs of different lengths do change sign here: the cross-tab is not trivially diagonal
    buckets = report["length_buckets"]
    assert sum(b["num_pairs"] for b in buckets) == len(pairs)
    assert sum(b["misaligned_fraction_summed"] * b["num_pairs"] for b in buckets) == pytest.approx(negative_summed)


def test_cross_tab_and_length_buckets_by_hand():
    summed = torch.tensor([-1.0, -1.0, 2.0, 0.0, 3.0, -2.0])
    per_token = torch.tensor([-0.5, 0.2, 0.1, 0.0, -0.1, -0.3])
    table = analysis.sign_crosstab(summed, per_token)
    assert table["summed_negative"] == {"per_token_negative": 2, "per_token_zero": 0, "per_token_positive": 1}
    assert table["summed_zero"] == {"per_token_negative": 0, "per_token_zero": 1, "per_token_positive": 0}
    assert table["summed_positive"] == {"per_token_negative": 1, "per_token_zero": 0, "per_token_positive": 1}
    assert analysis.sign_disagreement(summed, per_token) == {
        "sign_differs_fraction": 2 / 6,
        "misaligned_in_one_space_fraction": 2 / 6,
    }
    lengths = torch.tensor([2.0, 2.0, 4.0, 4.0, 8.0, 8.0])
    buckets = analysis.length_buckets(summed, per_token, lengths, lengths, num_buckets=3)
    assert [(b["min_tokens"], b["max_tokens"], b["num_pairs"]) for b in buckets] == [(2, 4, 4), (4, 8, 2)]
    assert [b["misaligned_fraction_summed"] for b in buckets] == [0.5, 0.5]
    assert [b["misaligned_fraction_per_token"] for b in buckets] == [0.25, 1.0]
    assert (
        buckets[1]["misaligned_fraction_per_token_ci_low"],
        buckets[1]["misaligned_fraction_per_token_ci_high"],
    ) == (wilson_interval(2, 2))


# -- the verdict ---------------------------------------------------------------------------------------------------------


def synthetic(deltas, per_token_logp=-2.0):
    """Pairs of one token each (summed == per-token) with the chosen at `per_token_logp` and the given delta_ref."""
    chosen = torch.full((len(deltas),), per_token_logp)
    rejected = chosen - torch.tensor(deltas)
    ones = torch.ones(len(deltas))
    return ReferenceLogps(chosen, rejected, ones, ones)


def verdict_of(reference, tmp_path, **config):
    args = CPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=2.5, **config)
    report = reference_report(
        reference.chosen, reference.rejected, reference.chosen_lengths, reference.rejected_lengths, args
    )
    return analysis.analyze(reference, args, "cpo", report)


def test_every_verdict_branch(tmp_path):
    # Per pair: m = gamma * (e^2 + e^(2 + delta)); lifted iff delta + m / 2.5 >= 0.
    fine = verdict_of(synthetic([1.0] * 100), tmp_path)["verdict"]
    assert fine.branch == "dpo_fine" and "DPO is fine" in fine.text and fine.caveat == ""
    # 20 of 100 misaligned: the upper CI bound is above 5%, so not "fine".
    small = synthetic([-0.1] * 20 + [1.0] * 80)
    configured = verdict_of(small, tmp_path, cpo_gamma=0.05)
    assert configured["verdict"].branch == "cpo_as_configured" and configured["cpo"]["lifted_fraction"] == 1.0
    large = synthetic([-1.0] * 20 + [1.0] * 80)  # needs gamma ~ 2.5 / (e^2 + e^1) = 0.25
    raised = verdict_of(large, tmp_path, cpo_gamma=0.05)
    assert raised["verdict"].branch == "cpo_recommended_gamma"
    assert raised["cpo"]["lifted_fraction"] == 0.0
    assert raised["cpo_at_recommended_gamma"]["lifted_fraction"] >= 0.9
    assert "cpo_gamma=0.2" in raised["verdict"].text and "cpo_auto_gamma=0.9" in raised["verdict"].text
    assert "lifts only 0% of" in raised["verdict"].text
    # Configured CPO lifts every pair, but only with its margins at the cap: the verdict says so, not "lifts only".
    at_cap = verdict_of(large, tmp_path, cpo_gamma=5.0)
    assert at_cap["cpo"]["lifted_fraction"] == 1.0 and at_cap["cpo"]["margin_at_cap_fraction"] == 1.0
    assert at_cap["verdict"].branch == "cpo_recommended_gamma", at_cap["verdict"].text
    assert "lifts 100% of" in at_cap["verdict"].text and "lifts only" not in at_cap["verdict"].text
    assert "100% of margins at cpo_max_margin, where CPO is DPO plus a constant" in at_cap["verdict"].text
    # A cap of 1 logit cannot lift a pair that needs 2.5: no gamma does it.
    capped = verdict_of(large, tmp_path, cpo_gamma=0.05, cpo_max_margin=1.0)
    assert capped["verdict"].branch == "use_ecpoc" and "cpo_max_margin=1" in capped["verdict"].text
    assert capped["ecpoc"]["lifted_fraction"] == 1.0 and "ECPOCTrainer" in capped["verdict"].text
    # The released numerics' negative margin never lifts: E-CPOC too.
    negative = verdict_of(large, tmp_path, cpo_margin_type="inverse_logp")
    assert negative["verdict"].branch == "use_ecpoc" and "inverse_logp" in negative["verdict"].text
    # Lifting 90% at a gamma that puts most margins at the cap is not a recommendation either.
    mostly_capped = synthetic([-1.0] * 20 + [1.0] * 80, per_token_logp=-2.0)
    mostly_capped.chosen[20:] = -6.0  # aligned pairs with tiny probabilities: huge 1/pi_ref, capped at gamma ~ 0.25
    mostly_capped.rejected[20:] = -7.0
    at_cap = verdict_of(mostly_capped, tmp_path, cpo_gamma=0.05)
    assert at_cap["cpo_at_recommended_gamma"]["margin_at_cap_fraction"] > analysis.MAX_AT_CAP_FRACTION
    assert at_cap["verdict"].branch == "use_ecpoc" and "sit at cpo_max_margin" in at_cap["verdict"].text


def test_caveat_names_the_confident_share():
    # Misaligned pairs are the most confident ones: far above the 25% expected by chance.
    delta = torch.tensor([-3.0] * 30 + [0.1] * 70)
    summary, mask = analysis.confident_misaligned(delta)
    assert summary["threshold"] == 3.0
    assert summary["misaligned_confident_fraction"] == 1.0 and int(mask.sum()) == 30
    common = dict(
        num_pairs=100,
        num_misaligned=30,
        misaligned_fraction=0.3,
        misaligned_fraction_ci_high=0.4,
        cpo={"cpo_gamma": 0.05, "lifted_fraction": 1.0, "margin_at_cap_fraction": 0.0},
        cpo_at_recommended=None,
        recommended_cpo_gamma=0.01,
        recommended_reason="",
        lift_share=0.9,
        ecpoc={"ecpoc_gamma": 0.5, "lifted_fraction": 1.0},
        method="cpo",
        cpo_gamma_is_configured=True,
    )
    strong = analysis.recommend(**common, confident=summary).caveat
    assert "mislabelled" in strong and "100% of the 30 misaligned pairs" in strong and "more than the 25%" in strong
    # Misaligned pairs with the smallest |delta_ref|: the caveat is stated, without the alarm.
    quiet, _ = analysis.confident_misaligned(torch.tensor([-0.01] * 30 + [2.0] * 70))
    weak = analysis.recommend(**common, confident=quiet).caveat
    assert "mislabelled" in weak and "0% of the 30" in weak and "more than" not in weak


# -- user errors: one line, exit 2, before anything loads ----------------------------------------------------------------


@pytest.fixture
def loads(monkeypatch):
    """Record any attempt to load data or the model (the model load stops the run with a sentinel error)."""
    calls = []
    real_load = data.load_train_split

    def load_train_split(settings):
        calls.append("data")
        return real_load(settings)

    def build_trainer(settings, dataset):
        calls.append("model")
        raise AuditError("sentinel: the model would load here")

    monkeypatch.setattr(data, "load_train_split", load_train_split)
    monkeypatch.setattr(score, "build_trainer", build_trainer)
    return calls


def run_cli(argv, capsys):
    code = audit.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    run_cli.notes = [line for line in err.splitlines() if line.startswith("note: ")]
    return code, lines


def test_bad_output_dir_fails_before_anything_loads(workspace, tmp_path, loads, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    reference = ["--reference_logps_file", tmp_path / "ref.safetensors"]
    for output_dir, expected in ((a_file, "is a file"), (a_file / "sub", "cannot write there")):
        code, lines = run_cli(["--config", workspace["yaml"], "--output_dir", output_dir, *reference], capsys)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("trl-cpo audit: error: --output_dir") and expected in lines[0]
    assert loads == []  # neither the data nor the model was loaded
    # A good folder passes the checks, loads the data, and reaches the model load.
    code, lines = run_cli(["--config", workspace["yaml"], "--output_dir", tmp_path / "ok", *reference], capsys)
    assert code == 2 and "sentinel" in lines[0] and loads == ["data", "model"]


def test_an_earlier_audit_is_not_overwritten_without_the_flag(audited, workspace, loads, capsys):
    code, lines = run_cli(["--config", workspace["yaml"]], capsys)
    assert code == 2 and len(lines) == 1 and "--overwrite_output_dir" in lines[0] and REPORT_FILE in lines[0]
    assert loads == []
    code, lines = run_cli(["--config", workspace["yaml"], "--overwrite_output_dir", "true"], capsys)
    assert "sentinel" in lines[0] and loads == ["data", "model"]
    assert os.path.isfile(os.path.join(workspace["output_dir"], REPORT_FILE))  # untouched until the audit is done


def _bad_inputs(workspace, tmp_path):
    rows = spaced_pairs(4)
    (tmp_path / "plain_folder").mkdir()
    no_rejected = tmp_path / "cols.jsonl"
    no_rejected.write_text(json.dumps({"prompt": "a", "chosen": " b", "response_b": " c"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(
        "".join(json.dumps({**r, "rejected": " " if i == 2 else r["rejected"]}) + "\n" for i, r in enumerate(rows))
    )
    wrong_type = tmp_path / "wrong.jsonl"
    wrong_type.write_text("".join(json.dumps({**r, "chosen": 1}) + "\n" for r in rows))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{not json\n')
    saved = tmp_path / "saved"
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(saved)
    not_yaml = tmp_path / "list.yaml"
    not_yaml.write_text("- a\n- b\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n'
    )
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    no_assistant = tmp_path / "chat.jsonl"
    chat = {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}]}
    no_assistant.write_text(json.dumps({**chat, "rejected": [{"role": "assistant", "content": "c"}]}) + "\n")
    return [
        (["--cpo_gamma", "-1"], "--cpo_gamma", False),
        (["--method", "ecpoc", "--ecpoc_tau", "0"], "--ecpoc_tau", False),
        (["--method", "nope"], "--method", False),
        (["--beta", "0"], "--beta", False),
        (["--max_samples", "0"], "--max_samples", False),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag", False),
        (["--model_name_or_path", tmp_path / "plain_folder"], "--model_name_or_path", False),
        (["--dataset_name", tmp_path / "missing.jsonl"], "--dataset_name", True),
        (["--dataset_name", bad_json], "bad.jsonl: could not be loaded (", True),
        (["--dataset_name", no_rejected], "'rejected'", True),
        (["--dataset_name", empty], "'rejected' has 1 empty completion(s)", True),  # refused, as training does
        (["--dataset_name", wrong_type], "'chosen' holds int", True),
        (["--dataset_name", saved], "--dataset_train_split", True),
        (["--dataset_name", latin1], f"{latin1}, line 2: the text is not valid UTF-8", True),
        (["--dataset_name", same], "no preference to learn", True),  # before the model loads
        (["--dataset_name", no_assistant], "'chosen' has 1 conversational completion(s) without an assistant", True),
    ], not_yaml


def test_every_user_error_is_one_line_with_exit_status_2(workspace, tmp_path, loads, capsys):
    cases, not_yaml = _bad_inputs(workspace, tmp_path)
    for extra, expected, data_loads in cases:
        loads.clear()
        argv = ["--config", workspace["yaml"], "--output_dir", tmp_path / "out"]
        argv += ["--reference_logps_file", tmp_path / "out" / "ref.safetensors", *extra]
        code, lines = run_cli(argv, capsys)
        assert code == audit.USER_ERROR, (extra, lines)
        assert len(lines) == 1 and lines[0].startswith("trl-cpo audit: error: "), (extra, lines)
        assert expected in lines[0], (expected, lines[0])
        assert ("model" in loads) == (expected == "sentinel") and (("data" in loads) == data_loads), (extra, loads)
        if str(extra[-1]).endswith("empty.jsonl"):
            assert "row(s) 2" in lines[0], lines[0]
        if str(extra[-1]).endswith("latin1.jsonl"):
            assert "re-encode it as UTF-8" in lines[0], lines[0]
    for argv, expected in (
        (["--config", tmp_path / "missing.yaml"], "--config"),
        (["--config", not_yaml], "--config"),
        (["--dataset_name", workspace["data"]], "--model_name_or_path is required"),
    ):
        code, lines = run_cli(argv, capsys)
        assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_unknown_config_keys_are_refused_as_training_refuses_them(workspace, tmp_path, loads, capsys):
    config = yaml.safe_load(open(workspace["yaml"]))
    config["cpo_gama"] = 0.2
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(config))
    code, lines = run_cli(["--config", typo, "--output_dir", tmp_path / "out"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--config" in lines[0] and "cpo_gama" in lines[0] and "cpo_gamma" in lines[0], lines[0]
    assert loads == []


def test_the_audit_never_writes_over_its_inputs(workspace, tmp_path, loads, capsys):
    out = tmp_path / "out"
    out.mkdir()
    data = out / PAIRS_FILE  # the user's data, where the audit writes its per-pair table
    data.write_bytes(open(workspace["data"], "rb").read())
    before = data.read_bytes()
    cases = [
        (["--dataset_name", data, "--output_dir", out], ["--dataset_name", str(data)]),
        (["--reference_logps_file", workspace["yaml"]], ["--config", workspace["yaml"]]),
        (["--reference_logps_file", os.path.join(workspace["model"], "config.json")], ["--model_name_or_path"]),
    ]
    for extra, expected in cases:
        for overwrite in ([], ["--overwrite_output_dir", "true"]):  # refused even with the flag
            argv = ["--config", workspace["yaml"], "--output_dir", tmp_path / "other", *extra, *overwrite]
            code, lines = run_cli(argv, capsys)
            assert code == 2 and len(lines) == 1, (extra, lines)
            for text in expected:
                assert text in lines[0], (text, lines[0])
    assert loads == [] and data.read_bytes() == before


@pytest.mark.parametrize("name", [PAIRS_FILE, PLOT_FILE, REPORT_FILE, "ref.safetensors"])
def test_any_file_the_audit_would_write_needs_the_flag(workspace, tmp_path, loads, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("an earlier run's file")
    argv = ["--config", workspace["yaml"], "--output_dir", out, "--reference_logps_file", out / "ref.safetensors"]
    code, lines = run_cli(argv, capsys)
    assert code == 2 and len(lines) == 1 and name in lines[0] and "--overwrite_output_dir" in lines[0], lines
    assert loads == [] and (out / name).read_text() == "an earlier run's file"
    code, lines = run_cli([*argv, "--overwrite_output_dir", "true"], capsys)
    assert "sentinel" in lines[0] and loads == ["data", "model"]


def test_pairs_identical_once_tokenized_are_refused_on_one_line(workspace, tmp_path, capsys):
    # The tiny tokenizer lowercases: the texts differ, the token ids do not.
    rows = [{"prompt": "the cat", "chosen": " Red dog", "rejected": " red DOG"}] * 4
    data_file = tmp_path / "upper.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    argv = ["--config", workspace["yaml"], "--dataset_name", data_file, "--output_dir", out]
    code, lines = run_cli([*argv, "--reference_logps_file", out / "ref.safetensors"], capsys)
    assert code == 2 and len(lines) == 1 and "same sequence of token ids" in lines[0], lines
    assert not out.exists() or not os.listdir(out)


# -- one reference pass ---------------------------------------------------------------------------------------------------


@pytest.fixture
def forwards(monkeypatch):
    """Count the trainers' reference precompute passes."""
    calls = []
    real = precompute.compute_reference_logps

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute, "compute_reference_logps", counting)
    return calls


def test_training_reuses_the_audits_reference_file(audited, workspace, trained, tmp_path, forwards):
    report, _ = audited
    path = workspace["reference_logps_file"]
    assert report["reference_logps_file"] == os.path.abspath(path)
    reference, fingerprint, _ = read_reference_logps(path)
    assert fingerprint.to_dict() == report["fingerprint"]
    trainer = cpo_trainer(workspace, tmp_path, reference_logps_file=path, max_steps=2)
    trainer.precompute_reference()  # what train() runs first
    assert forwards == []  # no reference forward ran
    torch.testing.assert_close(
        trainer.reference_margin(trainer.train_reference_logps),
        trained.reference_margin(trained.train_reference_logps),
    )
    assert trainer.train_dataset["ref_chosen_logps"] == trained.train_dataset["ref_chosen_logps"]
    assert trainer.reference_report.to_logs() == trained.reference_report.to_logs()
    trainer.train()  # and it trains on them


def test_an_audit_without_peft_serves_a_lora_run_on_the_same_base(audited, workspace, trained, tmp_path, forwards):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    path = workspace["reference_logps_file"]
    trainer = cpo_trainer(workspace, tmp_path, peft_config=lora, reference_logps_file=path)
    trainer.precompute_reference()
    assert forwards == [] and hasattr(trainer.model, "peft_config")
    assert trainer.train_dataset["ref_rejected_logps"] == trained.train_dataset["ref_rejected_logps"]
    # And that is right: the reference of a LoRA run, its base with the adapter disabled, scores as the audit did.
    own = cpo_trainer(workspace, tmp_path, peft_config=lora, reference_cache=False)  # not the audit's store entry
    own.precompute_reference()
    assert len(forwards) == 1
    torch.testing.assert_close(own.train_reference_logps.rejected, trained.train_reference_logps.rejected)


def test_a_reference_file_from_other_inputs_is_refused(audited, workspace, tmp_path, forwards):
    path = workspace["reference_logps_file"]
    other_model = save_model(tmp_path / "other-model", seed=4)
    cases = {
        "data (the file has 24 pairs, this train set 10)": dict(dataset=train_dataset(workspace).select(range(10))),
        "max_length (file: 10, keep_start; this run: 16, keep_start)": dict(max_length=16),
        "model weights": dict(model=other_model),
    }
    for expected, overrides in cases.items():
        with pytest.raises(ValueError, match="reference_logps_file") as error:
            cpo_trainer(workspace, tmp_path, reference_logps_file=path, **overrides)
        assert expected in str(error.value) and "trl-cpo audit --config" in str(error.value)
    assert forwards == []  # refused before any reference forward
    with pytest.raises(ValueError, match="does not exist"):
        CPOConfig(output_dir=str(tmp_path), reference_logps_file=str(tmp_path / "missing.safetensors"))


# -- E-CPOC, the CLI entry point, no matplotlib -------------------------------------------------------------------------


def test_ecpoc_through_the_cli_without_matplotlib(workspace, tmp_path, monkeypatch, capsys, caplog):
    from trl_cpo.cli import main

    monkeypatch.setattr(plots, "import_pyplot", lambda: None)
    out = tmp_path / "ecpoc"
    argv = ["audit", "--config", workspace["yaml"], "--method", "ecpoc", "--output_dir", out]
    argv += ["--reference_logps_file", out / "ref.safetensors", "--max_samples", 10]
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    assert "pip install 'trl-cpo[plots]'" in captured.err
    assert "method=ecpoc does not use cpo_gamma=0.05" in caplog.text  # the train script's warning
    assert sorted(os.listdir(out)) == sorted([REPORT_FILE, PAIRS_FILE, "ref.safetensors"])  # all but the figure
    assert PLOT_FILE not in os.listdir(out)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == "ecpoc" and report["num_pairs_input"] == 10
    assert report["floor_binding_fraction"] is not None and report["lifted_fraction"] is None
    assert report["method_settings"] == {"ecpoc_gamma": 0.5, "ecpoc_tau": 2.0, "ecpoc_alpha": 1.0}
    assert report["verdict"] in analysis.BRANCHES and "Verdict (" in captured.out
