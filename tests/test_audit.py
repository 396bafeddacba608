"""`trl-cpo audit` on a tiny local model: every input format, every user error, and the numbers checked by hand."""

import json
import os

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import WORDS, logp_by_hand, spaced_pairs

from trl_cpo import audit
from trl_cpo.losses import cpo_margin, ecpoc_target
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def implicit(rows):
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]


def conversational(rows):
    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text.strip()}]

    return [
        {"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
        for r in rows
    ]


@pytest.fixture(scope="module")
def audit_tokenizer():
    tokenizer = build_tiny_tokenizer(WORDS + ["user", "assistant", ":"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def audit_model(audit_tokenizer):
    return build_tiny_llama(audit_tokenizer, seed=3).eval()


@pytest.fixture(scope="module")
def audit_model_dir(tmp_path_factory, audit_model, audit_tokenizer):
    path = tmp_path_factory.mktemp("audit-model")
    audit_model.save_pretrained(path)
    audit_tokenizer.save_pretrained(path)
    return str(path)


def write(rows, path, fmt):
    path = str(path)
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    elif fmt == "parquet":
        Dataset.from_list(rows).to_parquet(path)
    elif fmt == "disk":
        Dataset.from_list(rows).save_to_disk(path)
    elif fmt == "disk_dict":
        DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(path)
    return path


def run(*argv, output_dir):
    return audit.main([*map(str, argv), "--output_dir", str(output_dir)])


def read_outputs(output_dir):
    with open(os.path.join(output_dir, audit.REPORT_FILE)) as f:
        report = json.load(f)
    with open(os.path.join(output_dir, audit.PAIRS_FILE)) as f:
        pairs = [json.loads(line) for line in f]
    return report, pairs


@pytest.fixture(scope="module")
def by_hand(audit_model, audit_tokenizer):
    """Summed log-probs and completion lengths of `spaced_pairs()`, computed from the model's logits."""
    columns = {"chosen": [], "chosen_len": [], "rejected": [], "rejected_len": []}
    for row in spaced_pairs():
        for key in ("chosen", "rejected"):
            logp, length = logp_by_hand(audit_model, audit_tokenizer, row["prompt"], row[key])
            columns[key].append(logp)
            columns[f"{key}_len"].append(length)
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in columns.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_misalignment_rate_matches_a_by_hand_computation(tmp_path, audit_model_dir, by_hand, loss_type):
    rows = spaced_pairs()
    data = write(rows, tmp_path / "pairs.jsonl", "jsonl")
    argv = ("--model_name_or_path", audit_model_dir, "--dataset_name", data, "--loss_type", loss_type)
    assert run(*argv, "--precompute_ref_batch_size", 5, output_dir=tmp_path) == 0
    report, pairs = read_outputs(tmp_path)
    token_chosen, token_rejected = (
        by_hand["chosen"] / by_hand["chosen_len"],
        by_hand["rejected"] / by_hand["rejected_len"],
    )
    chosen, rejected = by_hand["chosen"], by_hand["rejected"]
    if loss_type == "sigmoid_norm":
        chosen, rejected = token_chosen, token_rejected
    delta = chosen - rejected
    assert [p["row"] for p in pairs] == list(range(len(rows)))
    assert [p["chosen_tokens"] for p in pairs] == by_hand["chosen_len"].long().tolist()
    torch.testing.assert_close(torch.tensor([p["delta_ref"] for p in pairs]), delta, atol=1e-4, rtol=1e-4)
    expected_rate = (delta < 0).float().mean().item()
    assert 0 < expected_rate < 1  # the check means something
    assert report["misalignment_rate"] == pytest.approx(expected_rate)
    assert report["log_prob_space"] == ("length-normalized" if loss_type == "sigmoid_norm" else "summed")
    assert report["loss_type"] == loss_type
    assert report["delta_ref"]["q50"] == pytest.approx(torch.quantile(delta.double(), 0.5).item(), abs=1e-4)
    # The CPO margin reads per-token reference log-probs in both spaces, as the trainers do; E-CPOC's target is in
    # the report's space.
    margin = cpo_margin(token_chosen, token_rejected, gamma=0.05)
    assert report["cpo"]["capped_fraction"] < 1  # per-token: not pinned at the cap, even in the summed space
    target = ecpoc_target(chosen, rejected, gamma=0.5, tau=2.0, alpha=1.0)
    torch.testing.assert_close(torch.tensor([p["cpo_margin"] for p in pairs]), margin, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([p["ecpoc_target"] for p in pairs]), target, atol=1e-4, rtol=1e-4)
    assert os.path.getsize(tmp_path / audit.HISTOGRAM_FILE) > 1000
    assert f"{100 * expected_rate:.1f}%" in report["recommendation"]


@pytest.mark.parametrize(
    ("fmt", "name", "shape", "extra"),
    [
        ("json", "data.json", "explicit", []),
        ("parquet", "data.parquet", "implicit", []),
        ("disk", "saved", "explicit", []),
        ("disk_dict", "saved_dict", "implicit", ["--dataset_train_split", "test"]),
        ("jsonl", "chat.jsonl", "conversational", []),
        ("jsonl", "chat_implicit.jsonl", "conversational_implicit", []),
    ],
)
def test_every_input_format(tmp_path, audit_model_dir, by_hand, fmt, name, shape, extra, capsys):
    rows = spaced_pairs()
    if shape == "implicit":
        rows = implicit(rows)
    elif shape.startswith("conversational"):
        rows = conversational(rows)
        if shape == "conversational_implicit":
            rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    data = write(rows, tmp_path / name, fmt)
    argv = ("--model_name_or_path", audit_model_dir, "--dataset_name", data, "--loss_type", "sigmoid", *extra)
    assert run(*argv, output_dir=tmp_path / "out") == 0
    report, pairs = read_outputs(tmp_path / "out")
    assert report["num_pairs_scored"] == len(rows) == len(pairs)
    assert "misalignment rate" in capsys.readouterr().out
    if shape in ("explicit", "implicit"):
        # The same text pairs give the same numbers whatever the file format and wherever the prompt is.
        expected = (by_hand["chosen"] - by_hand["rejected"]).tolist()
        assert [p["delta_ref"] for p in pairs] == pytest.approx(expected, abs=1e-4)


def test_max_samples_max_length_and_4bit(tmp_path, audit_model_dir):
    rows = spaced_pairs()
    data = write(rows, tmp_path / "pairs.jsonl", "jsonl")
    assert (
        run(
            "--model_name_or_path",
            audit_model_dir,
            "--dataset_name",
            data,
            "--max_samples",
            5,
            output_dir=tmp_path / "a",
        )
        == 0
    )
    assert read_outputs(tmp_path / "a")[0]["num_pairs_scored"] == 5
    # A prompt of 5 tokens fills max_length=5: such pairs are dropped (as TRL drops them), the others truncated.
    assert (
        run(
            "--model_name_or_path",
            audit_model_dir,
            "--dataset_name",
            data,
            "--max_length",
            5,
            output_dir=tmp_path / "b",
        )
        == 0
    )
    report, pairs = read_outputs(tmp_path / "b")
    long_prompts = sum(len(r["prompt"].split()) >= 5 for r in rows)
    assert report["num_pairs_dropped"] == long_prompts and len(pairs) == len(rows) - long_prompts
    assert report["num_pairs_truncated"] > 0
    pytest.importorskip("bitsandbytes")
    assert (
        run(
            "--model_name_or_path",
            audit_model_dir,
            "--dataset_name",
            data,
            "--load_in_4bit",
            output_dir=tmp_path / "c",
        )
        == 0
    )
    exact = [p["delta_ref"] for p in read_outputs(tmp_path / "a")[1]]
    quantized = [p["delta_ref"] for p in read_outputs(tmp_path / "c")[1]][:5]
    assert quantized == pytest.approx(exact, abs=0.1)  # NF4 noise only


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory, audit_model, audit_tokenizer):
    path = tmp_path_factory.mktemp("no-pad-model")
    audit_model.save_pretrained(path)
    tokenizer = build_tiny_tokenizer(WORDS)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return str(path)


def test_no_pad_token_is_an_error_unless_given(tmp_path, no_pad_model_dir, capsys):
    data = write(spaced_pairs(4), tmp_path / "pairs.jsonl", "jsonl")
    assert (
        run("--model_name_or_path", no_pad_model_dir, "--dataset_name", data, output_dir=tmp_path / "a")
        == audit.USER_ERROR
    )
    err = capsys.readouterr().err
    assert "has no pad token" in err and "--pad_token '</s>'" in err and no_pad_model_dir in err
    assert (
        run(
            "--model_name_or_path",
            no_pad_model_dir,
            "--dataset_name",
            data,
            "--pad_token",
            "<nope>",
            output_dir=tmp_path,
        )
        == 2
    )
    assert "not in the vocabulary" in capsys.readouterr().err
    assert (
        run(
            "--model_name_or_path",
            no_pad_model_dir,
            "--dataset_name",
            data,
            "--pad_token",
            "</s>",
            output_dir=tmp_path / "b",
        )
        == 0
    )


def _bad_inputs(tmp_path, model_dir):
    rows = spaced_pairs(4)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{not json\n')
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    (tmp_path / "plain_folder").mkdir()
    no_rejected = [{"prompt": r["prompt"], "chosen": r["chosen"], "response_b": r["rejected"]} for r in rows]
    empty = [dict(r) for r in rows]
    empty[2]["rejected"] = "  "
    wrong_type = [dict(r) for r in rows]
    wrong_type[1]["chosen"] = 1
    empty_chat = conversational(rows)
    empty_chat[1]["chosen"] = [{"role": "assistant", "content": ""}]
    return {
        "missing file": (["--dataset_name", tmp_path / "nope.jsonl"], ["nope.jsonl", "no such file"]),
        "bad json": (["--dataset_name", tmp_path / "bad.jsonl"], ["bad.jsonl", "could not be read as json"]),
        "unsupported type": (["--dataset_name", tmp_path / "data.csv"], ["data.csv", "unsupported file type"]),
        "not a saved dataset": (["--dataset_name", tmp_path / "plain_folder"], ["plain_folder", "save_to_disk"]),
        "missing column": (
            ["--dataset_name", write(no_rejected, tmp_path / "cols.jsonl", "jsonl")],
            ["cols.jsonl", "'rejected'", "response_b", "rename"],
        ),
        "empty completion": (
            ["--dataset_name", write(empty, tmp_path / "empty.jsonl", "jsonl")],
            ["empty.jsonl", "'rejected'", "row(s) 2", "filter"],
        ),
        "wrong value type": (
            ["--dataset_name", write(wrong_type, tmp_path / "wrong_type.jsonl", "jsonl")],
            ["wrong_type.jsonl", "'chosen'", "int", "row(s) 1"],
        ),
        "empty chat completion": (
            ["--dataset_name", write(empty_chat, tmp_path / "empty_chat.jsonl", "jsonl")],
            ["'chosen'", "row(s) 1"],
        ),
        "missing split": (
            ["--dataset_name", write(rows, tmp_path / "dd", "disk_dict"), "--dataset_train_split", "train"],
            ["no split 'train'", "['test']", "--dataset_train_split"],
        ),
        "bad gamma": (
            ["--dataset_name", write(rows, tmp_path / "ok.jsonl", "jsonl"), "--cpo_gamma", "-1"],
            ["--cpo_gamma", "cpo_gamma=-1.0"],
        ),
        "bad tau": (
            ["--dataset_name", tmp_path / "ok.jsonl", "--ecpoc_tau", "0"],
            ["--ecpoc_tau", "ecpoc_tau=0.0"],
        ),
        "model is not a folder": (
            ["--dataset_name", tmp_path / "ok.jsonl", "--model_name_or_path", tmp_path / "missing-model"],
            ["missing-model", "no such folder"],
        ),
        "model folder without config": (
            ["--dataset_name", tmp_path / "ok.jsonl", "--model_name_or_path", tmp_path / "plain_folder"],
            ["plain_folder", "config.json"],
        ),
    }


def test_bad_inputs_exit_nonzero_with_a_message(tmp_path, audit_model_dir, capsys):
    for case, (argv, expected) in _bad_inputs(tmp_path, audit_model_dir).items():
        model = [] if "--model_name_or_path" in argv else ["--model_name_or_path", audit_model_dir]
        assert run(*model, *argv, output_dir=tmp_path / "out") == audit.USER_ERROR, case
        err = capsys.readouterr().err
        assert err.startswith("trl-cpo audit: error: "), (case, err)
        for text in expected:
            assert text in err, (case, text, err)
    assert not (tmp_path / "out").exists()


def test_conversational_data_needs_a_chat_template(tmp_path, no_pad_model_dir, capsys):
    data = write(conversational(spaced_pairs(4)), tmp_path / "chat.jsonl", "jsonl")
    argv = ("--model_name_or_path", no_pad_model_dir, "--dataset_name", data, "--pad_token", "</s>")
    assert run(*argv, output_dir=tmp_path / "out") == audit.USER_ERROR
    assert "no chat template" in capsys.readouterr().err


def test_console_entry_point_reports_user_errors_without_traceback(tmp_path, audit_model_dir, capsys):
    from trl_cpo.cli import main

    argv = ["audit", "--model_name_or_path", audit_model_dir, "--dataset_name", str(tmp_path / "missing.parquet")]
    assert main(argv) == audit.USER_ERROR  # returned, not raised: no traceback
    assert "missing.parquet: no such file or folder" in capsys.readouterr().err


def test_ties_after_truncation_are_reported_not_counted_as_aligned():
    # two pairs differ only past the truncation point: delta_ref == 0 exactly
    message = audit.recommendation(0.0, "summed", tie_fraction=0.5, truncated_fraction=0.5)
    assert "every pair that is not a tie" in message and "50.0% of pairs are ties" in message
    assert "truncated by --max_length" in message
    assert "every pair," not in audit.recommendation(0.0, "summed", tie_fraction=0.5)
