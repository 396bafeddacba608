"""Bad data is refused before the precompute, by the one validator the trainers and the audit share (issue 10 item 6).

Each case is a `ValueError` naming the dataset, the column, the first offending rows and the fix; every format TRL
accepts (explicit or implicit prompt, text or conversational) goes through; pairs TRL drops or truncates for length are
counted and logged once, with the `max_length` that would keep them.
"""

from __future__ import annotations

import logging

import pytest
from conftest import make_pairs
from datasets import Dataset
from helpers import cpu_args

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.tiny import build_tiny_llama


def build(tokenizer, tmp_path, rows=None, *, dataset=None, eval_dataset=None, trainer_cls=CPOTrainer, **config):
    config_cls = CPOConfig if trainer_cls is CPOTrainer else ECPOCConfig
    return trainer_cls(
        model=build_tiny_llama(tokenizer),
        args=config_cls(**cpu_args(tmp_path, **config)),
        train_dataset=dataset if dataset is not None else Dataset.from_list(rows),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def with_row(rows, index, **changes):
    rows = [dict(r) for r in rows]
    rows[index].update(changes)
    return rows


def messages(role, text):
    return [{"role": role, "content": text}]


BAD_DATA = {
    # case: (rows or dataset factory, texts the message must contain)
    "missing column": (
        lambda: Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"]} for r in make_pairs(4)]),
        ["train_dataset", "no column 'rejected'", "['prompt', 'chosen']", "rename_column"],
    ),
    "unpaired data": (
        lambda: Dataset.from_list([{"prompt": "a", "completion": " b", "label": True}] * 3),
        ["no column 'chosen' or 'rejected'", "unpaired", "completion"],
    ),
    "empty dataset": (
        lambda: Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}),
        ["train_dataset has no rows"],
    ),
    "None field": (
        lambda: Dataset.from_list(with_row(make_pairs(8), 3, chosen=None)),
        ["train_dataset", "column 'chosen'", "None", "row(s) 3", "filter"],
    ),
    "None prompt": (
        lambda: Dataset.from_list(with_row(with_row(make_pairs(8), 1, prompt=None), 6, prompt=None)),
        ["column 'prompt'", "row(s) 1, 6"],
    ),
    "non-string values": (
        lambda: Dataset.from_list([{**r, "rejected": 3} for r in make_pairs(12)]),
        ["column 'rejected'", "int", "row(s) 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...", "text"],
    ),
    "empty completion": (
        lambda: Dataset.from_list(with_row(make_pairs(8), 2, rejected="")),
        ["column 'rejected'", "1 empty completion", "row(s) 2", "EOS", "filter"],
    ),
    "blank completion": (
        lambda: Dataset.from_list(with_row(make_pairs(8), 5, chosen="  \n")),
        ["column 'chosen'", "row(s) 5"],
    ),
    "implicit prompt with an empty completion": (
        lambda: Dataset.from_list(
            [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in make_pairs(4)]
            + [{"chosen": "the cat runs", "rejected": ""}]
        ),
        ["column 'rejected'", "row(s) 4"],
    ),
    "mixed formats": (
        lambda: Dataset.from_list(
            [
                {
                    "prompt": "hi",
                    "chosen": [{"role": "assistant", "content": "yes"}],
                    "rejected": [{"role": "assistant", "content": "no"}],
                }
            ]
        ),
        ["'prompt'", "text", "'chosen'", "messages", "same format"],
    ),
    "empty chat completion": (
        lambda: Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": "hi"}],
                    "chosen": [{"role": "assistant", "content": "yes" if i != 1 else " "}],
                    "rejected": [{"role": "assistant", "content": "no"}],
                }
                for i in range(3)
            ]
        ),
        ["column 'chosen'", "row(s) 1"],
    ),
    "chat completion without an assistant message": (
        lambda: Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": "hi"}],
                    "chosen": [{"role": "assistant", "content": "yes"}],
                    "rejected": [{"role": "user" if i == 2 else "assistant", "content": "no"}],
                }
                for i in range(4)
            ]
        ),
        ["column 'rejected'", "without an assistant message", "row(s) 2 (1 in all)", "'prompt'"],
    ),
    "implicit chat ending on a user turn": (
        lambda: Dataset.from_list(
            [
                {
                    "chosen": messages("user", "sky?") + messages("assistant", "blue"),
                    "rejected": messages("user", "sky?") + messages("user", "well?"),
                }
            ]
            * 2
        ),
        ["column 'rejected'", "without an assistant message", "implicit prompt", "row(s) 0, 1"],
    ),
    "every pair identical": (
        lambda: Dataset.from_list([{**r, "rejected": r["chosen"]} for r in make_pairs(4)]),
        ["train_dataset", "all of its 4 pairs", "the same", "no preference to learn"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_is_refused_before_the_precompute(tokenizer, tmp_path, case):
    factory, expected = BAD_DATA[case]
    with pytest.raises(ValueError) as info:
        build(tokenizer, tmp_path, dataset=factory())
    message = str(info.value)
    for text in expected:
        assert text in message, (case, text, message)


def test_bad_data_is_refused_before_any_model_loads():
    # The validator alone, as the audit runs it before loading the model.
    from trl_cpo.data import validate_preference_dataset

    for case in ("chat completion without an assistant message", "every pair identical"):
        with pytest.raises(ValueError, match="train_dataset"):
            validate_preference_dataset(BAD_DATA[case][0](), "train_dataset")


def test_pairs_identical_once_tokenized_are_refused_when_all_and_counted_when_some(tokenizer, tmp_path, caplog):
    # The tiny tokenizer lowercases: " Cat dog" and " cat DOG" are the same token ids.
    rows = [{"prompt": "the bird", "chosen": " Cat dog", "rejected": " cat DOG"} for _ in range(3)]
    with pytest.raises(ValueError) as info:
        build(tokenizer, tmp_path, rows)
    message = str(info.value)
    for text in ("train_dataset", "all of its 3 pairs", "same sequence of token ids", "no gradient", "lowercase"):
        assert text in message, (text, message)

    rows = [{**row, "prompt": "a"} for row in make_pairs(8, seed=0)]  # chosen and rejected differ at their 1st word
    rows[2] = {"prompt": "a", "chosen": " Red cat", "rejected": " red CAT"}  # identical once tokenized
    # Differ only in the 4th completion token: identical once keep_start truncates to 1 + 3 tokens.
    rows[5] = {"prompt": "a", "chosen": " red cat dog sad", "rejected": " red cat dog happy"}
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer = build(tokenizer, tmp_path, rows, max_length=4)
    assert len(trainer.train_dataset) == 8
    warnings = [r.getMessage() for r in caplog.records if "cannot teach" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for text in ("train_dataset: 2 of 8 pairs", "row(s) 2, 5 (2 in all)", "1 of them only once truncated",
                 "max_length=5 keeps their difference"):  # fmt: skip
        assert text in warnings[0], (text, warnings[0])


def test_identical_pairs_as_the_collator_truncates_them():
    from trl_cpo.pair_checks import identical_pairs

    prepared = Dataset.from_list(
        [
            {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [3, 4, 6]},  # differ at completion token 3
            {"prompt_ids": [1], "chosen_ids": [7, 8, 9], "rejected_ids": [6, 8, 9]},  # differ at completion token 1
            {"prompt_ids": [1], "chosen_ids": [3, 4], "rejected_ids": [3, 4]},  # the same
        ]
    )
    assert identical_pairs(prepared) == ([2], [], None)
    assert identical_pairs(prepared, max_length=4) == ([0, 2], [0], 5)
    assert identical_pairs(prepared, max_length=2, truncation_mode="keep_end") == ([1, 2], [1], 3)


def test_bad_eval_data_is_named_by_its_key(tokenizer, tmp_path, train_dataset):
    bad = Dataset.from_list(with_row(make_pairs(4, seed=3), 2, chosen=None))
    with pytest.raises(
        ValueError, match=r"eval_dataset\['held_out'\]: column 'chosen' holds None at row\(s\) 2 \(1 in all\)"
    ):
        build(tokenizer, tmp_path, dataset=train_dataset, eval_dataset={"ok": train_dataset, "held_out": bad})
    trainer = build(tokenizer, tmp_path, dataset=train_dataset, trainer_cls=ECPOCTrainer)
    with pytest.raises(ValueError, match=r"eval_dataset: column 'chosen' holds None"):
        trainer.evaluate(eval_dataset=bad)


def test_every_prompt_over_max_length_is_refused_with_the_length_that_would_keep_them(tokenizer, tmp_path):
    rows = [{"prompt": " ".join(["red"] * n), "chosen": " cat", "rejected": " dog"} for n in (6, 8, 7)]
    with pytest.raises(ValueError) as info:
        build(tokenizer, tmp_path, rows, max_length=5)
    message = str(info.value)
    for text in (
        "train_dataset",
        "'prompt'",
        "every one of its 3 pairs",
        "max_length=5",
        "row(s) 0, 1, 2",
        "shortest prompt: 6 tokens",
        "max_length=7",
        "max_length=10",
    ):
        assert text in message, (text, message)


def test_pairs_dropped_or_truncated_for_length_are_counted_and_logged_once(tokenizer, tmp_path, caplog):
    # One word is one token, and completions end with EOS; the random pairs are at most 6 + 8 = 14 tokens long.
    rows = make_pairs(12, seed=0)
    rows[4] = {"prompt": " ".join(["blue"] * 14), "chosen": " cat", "rejected": " dog dog"}  # 14 + 3: dropped
    rows[9] = {"prompt": " ".join(["blue"] * 16), "chosen": " cat", "rejected": " dog"}  # 16 + 2: dropped
    rows[1] = {"prompt": "red", "chosen": " " + " ".join(["cat"] * 14), "rejected": " dog"}  # 1 + 15: truncated
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer = build(tokenizer, tmp_path, rows, max_length=14)
    assert len(trainer.train_dataset) == 10
    messages = [r.getMessage() for r in caplog.records if "max_length=14" in r.getMessage()]
    assert len(messages) == 1, messages
    message = messages[0]
    expected = (
        "train_dataset",
        "2 of 12 pairs dropped",
        "rows 4, 9",
        "max_length=17 keeps them",
        "1 of the 10 kept pairs truncated",
        "max_length=18 keeps every pair whole",
    )
    for text in expected:
        assert text in message, (text, message)


# -- the validator itself: every format TRL accepts goes through --------------------------------------------------------


VALID = {
    "explicit text": [{"prompt": "the sky is", "chosen": " blue", "rejected": " green"}],
    "empty prompt": [{"prompt": "", "chosen": "blue", "rejected": "green"}],
    "implicit text": [{"chosen": "the sky is blue", "rejected": "the sky is green"}],
    "explicit chat": [
        {
            "prompt": messages("user", "sky?"),
            "chosen": messages("assistant", "blue"),
            "rejected": messages("assistant", "red"),
        }
    ],
    "implicit chat": [
        {
            "chosen": messages("user", "sky?") + messages("assistant", "blue"),
            "rejected": messages("user", "sky?") + messages("assistant", "red"),
        }
    ],
    "chat with a tool call and no content": [
        {
            "prompt": messages("user", "weather?"),
            "chosen": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}],
                }
            ],
            "rejected": messages("assistant", "no idea"),
        }
    ],
    "extra columns": [{"prompt": "a", "chosen": " b", "rejected": " c", "score": 3.5, "id": "x"}],
}


@pytest.mark.parametrize("case", list(VALID))
def test_every_trl_format_is_accepted(case):
    from trl_cpo.data import validate_preference_dataset

    validate_preference_dataset(Dataset.from_list(VALID[case] * 3), "train_dataset")


def test_valid_explicit_and_implicit_text_data_trains(tokenizer, tmp_path):
    rows = make_pairs(8)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    for data in (rows, implicit):
        trainer = build(tokenizer, tmp_path, data, max_steps=1)
        assert len(trainer.train_reference_logps) == 8


def test_the_audit_uses_the_same_validator():
    from trl_cpo.data import validate_preference_dataset
    from trl_cpo.scripts.audit.args import AuditError
    from trl_cpo.scripts.audit.data import check_pairs

    bad = Dataset.from_list(with_row(make_pairs(4), 2, rejected=""))
    with pytest.raises(ValueError) as trainer_side:
        validate_preference_dataset(bad, "--dataset_name data.jsonl")
    with pytest.raises(AuditError) as audit_side:
        check_pairs(bad, "--dataset_name data.jsonl")
    assert str(audit_side.value) == str(trainer_side.value)


# -- the loader: text that is not UTF-8 ----------------------------------------------------------------------------------


def test_undecodable_text_names_the_file_and_the_line(tmp_path, monkeypatch):
    import gzip

    from trl_cpo.dataset_loading import load_preference_dataset

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    good = b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n'
    files = {
        # Arrow's JSON reader takes the bytes as they are: the error would come at the first read of row 2.
        "latin1.jsonl": good + b'{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n',
        # A type change sends `datasets` to its Python JSON reader, which fails to decode.
        "mixed.jsonl": good
        + b'{"prompt": "a", "chosen": " b\xff", "rejected": " c", "x": [1]}\n'
        + b'{"prompt": "a", "chosen": " b", "rejected": " c", "x": ["s"]}\n',
        "pairs.csv": b"prompt,chosen,rejected\na,b,c\ncaf\xe9,b,c\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with gzip.open(tmp_path / "latin1.jsonl.gz", "wb") as f:
        f.write(files["latin1.jsonl"])
    lines = {"latin1.jsonl": 2, "mixed.jsonl": 2, "pairs.csv": 3, "latin1.jsonl.gz": 2}
    for name, line in lines.items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as info:
            load_preference_dataset(path)
        message = str(info.value)
        for text in (path, f"line {line}", "not valid UTF-8", "re-encode it as UTF-8"):
            assert text in message, (name, text, message)
    # A `datasets:` mixture naming the file.
    from trl import DatasetMixtureConfig, ScriptArguments

    from trl_cpo.dataset_loading import load_datasets

    mixture = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": str(tmp_path / "latin1.jsonl")}])
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: .*re-encode it as UTF-8"):
        load_datasets(ScriptArguments(dataset_name=None), mixture)
    (tmp_path / "ok.jsonl").write_bytes(good + '{"prompt": "café", "chosen": " b", "rejected": " c"}\n'.encode())
    assert load_preference_dataset(str(tmp_path / "ok.jsonl"))["train"][1]["prompt"] == "café"
