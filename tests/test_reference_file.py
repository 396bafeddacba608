"""The checkpoint's reference file (`trl_cpo_reference.safetensors`, issue 10 item 4): every way it can be damaged is
refused with one error type that names the file, what is wrong and the fix, before a single training step runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import cpu_args
from safetensors.torch import save_file

from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.reference import ReferenceLogps
from trl_cpo.reference_store import (
    REFERENCE_FILE,
    ReferenceFileError,
    load_reference_checkpoint,
    read_reference_metadata,
    save_reference_checkpoint,
)
from trl_cpo.tiny import build_tiny_llama


def reference(n: int = 5, seed: int = 0) -> ReferenceLogps:
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 9, (n,), generator=g).float()
    rejected_lengths = torch.randint(1, 9, (n,), generator=g).float()
    return ReferenceLogps(
        chosen=-torch.rand(n, generator=g) * chosen_lengths,
        rejected=-torch.rand(n, generator=g) * rejected_lengths,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def write_valid(folder) -> dict[str, ReferenceLogps]:
    splits = {"train": reference(5, seed=0), "eval/eval": reference(3, seed=1)}
    save_reference_checkpoint(str(folder), splits, metadata={"method": "cpo", "settings": {"cpo_gamma": 0.05}})
    return splits


def tensors_and_header(folder):
    from safetensors import safe_open

    path = os.path.join(folder, REFERENCE_FILE)
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_a_valid_file_round_trips(tmp_path):
    splits = write_valid(tmp_path)
    loaded = load_reference_checkpoint(str(tmp_path))
    assert list(loaded) == ["train", "eval/eval"]
    for name, saved in splits.items():
        for field in ("chosen", "rejected", "chosen_lengths", "rejected_lengths"):
            assert torch.equal(getattr(loaded[name], field), getattr(saved, field))
    assert read_reference_metadata(str(tmp_path))["settings"] == {"cpo_gamma": 0.05}


def _rewrite(folder, *, tensors=None, header=None, drop=None):
    """Rewrite the file with some tensors / header entries replaced (None values drop them)."""
    old_tensors, old_header = tensors_and_header(folder)
    new_tensors = {**old_tensors, **(tensors or {})}
    new_header = {**old_header, **(header or {})}
    for key in drop or []:
        new_tensors.pop(key, None)
        new_header.pop(key, None)
    save_file(new_tensors, os.path.join(folder, REFERENCE_FILE), metadata=new_header or None)


def _nan_chosen(folder):
    chosen = tensors_and_header(folder)[0]["0.chosen"].clone()
    chosen[2] = float("nan")
    _rewrite(folder, tensors={"0.chosen": chosen})


def _inf_length(folder):
    t, _ = tensors_and_header(folder)
    _rewrite(folder, tensors={"1.rejected_lengths": torch.full_like(t["1.rejected_lengths"], float("inf"))})


def _truncated(folder):
    path = os.path.join(folder, REFERENCE_FILE)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _garbage(folder):
    open(os.path.join(folder, REFERENCE_FILE), "wb").write(os.urandom(64) + b"\x00" * 100)


def _empty(folder):
    open(os.path.join(folder, REFERENCE_FILE), "wb").close()


def _no_metadata(folder):
    t, _ = tensors_and_header(folder)
    save_file(t, os.path.join(folder, REFERENCE_FILE))


CORRUPTIONS = {
    "nan values": (_nan_chosen, ["non-finite", "'train'", "chosen"]),
    "inf lengths": (_inf_length, ["non-finite", "'eval/eval'", "rejected_lengths"]),
    "truncated file": (_truncated, ["not a readable safetensors file"]),
    "garbage bytes": (_garbage, ["not a readable safetensors file"]),
    "empty file": (_empty, ["not a readable safetensors file"]),
    "missing metadata": (_no_metadata, ["no 'splits'"]),
    "splits not json": (lambda f: _rewrite(f, header={"splits": "train,eval"}), ["'splits'", "JSON"]),
    "splits not a list": (lambda f: _rewrite(f, header={"splits": json.dumps({"a": 1})}), ["'splits'", "list"]),
    "settings not json": (lambda f: _rewrite(f, header={"trl_cpo": "{oops"}), ["'trl_cpo'", "JSON"]),
    "missing tensor": (lambda f: _rewrite(f, drop=["0.rejected_lengths"]), ["'train'", "0.rejected_lengths"]),
    "extra split tensor": (
        lambda f: _rewrite(f, header={"splits": json.dumps(["train", "eval/eval", "eval/other"])}),
        ["'eval/other'", "missing"],
    ),
    "shape mismatch": (
        lambda f: _rewrite(f, tensors={"0.rejected": -torch.ones(4)}),
        ["'train'", "rejected", "4", "5"],
    ),
    "two-dimensional": (lambda f: _rewrite(f, tensors={"0.chosen": -torch.ones(5, 2)}), ["'train'", "1-D"]),
    "wrong dtype": (
        lambda f: _rewrite(f, tensors={"0.chosen": -torch.ones(5, dtype=torch.float64)}),
        ["'train'", "chosen", "float64", "float32"],
    ),
    "negative lengths": (
        lambda f: _rewrite(f, tensors={"0.chosen_lengths": -torch.ones(5)}),
        ["'train'", "chosen_lengths", "token count"],
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_corruption_raises_one_error_naming_the_file_the_problem_and_the_fix(tmp_path, case):
    corrupt, expected = CORRUPTIONS[case]
    write_valid(tmp_path)
    corrupt(tmp_path)
    path = os.path.join(tmp_path, REFERENCE_FILE)
    for read in (load_reference_checkpoint, read_reference_metadata):
        if read is read_reference_metadata and case not in ("truncated file", "garbage bytes", "empty file"):
            continue  # the metadata reader only parses the header
        with pytest.raises(ReferenceFileError) as info:
            read(str(tmp_path))
        message = str(info.value)
        assert path in message, message
        assert "delete" in message.lower() and "recompute" in message.lower(), message
        for text in expected:
            assert text in message, (case, text, message)
    assert isinstance(info.value, ValueError)  # one type, catchable as a ValueError like every other input error


def test_the_file_is_written_atomically(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous file (or none) and no partial file under the real name."""
    splits = write_valid(tmp_path)
    import trl_cpo.reference as reference_module

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill between the temporary file and the rename

    monkeypatch.setattr(reference_module.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        save_reference_checkpoint(str(tmp_path), {"train": reference(7, seed=3)})
    monkeypatch.undo()
    loaded = load_reference_checkpoint(str(tmp_path))
    assert torch.equal(loaded["train"].chosen, splits["train"].chosen)
    # the next successful write cleans up what the dead one left behind
    save_reference_checkpoint(str(tmp_path), {"train": reference(7, seed=3)})
    assert sorted(os.listdir(tmp_path)) == [REFERENCE_FILE]


def _no_train_split(folder):
    _rewrite(folder, header={"splits": json.dumps(["eval/eval"])})


@pytest.mark.parametrize(
    "corrupt, expected", [(_nan_chosen, "non-finite.*delete"), (_no_train_split, "no 'train' split.*delete")]
)
def test_resume_from_a_damaged_reference_stops_before_training(tokenizer, train_dataset, tmp_path, corrupt, expected):
    """The issue's repro: NaN reference values used to train a step with loss 0.0 and write NaN weights."""
    args = dict(max_steps=2, save_strategy="steps", save_steps=2)
    CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=CPOConfig(**cpu_args(tmp_path, **args)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    ).train()
    checkpoint = tmp_path / "checkpoint-2"
    corrupt(checkpoint)
    resumed = CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=CPOConfig(**cpu_args(tmp_path, **{**args, "max_steps": 4})),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    with pytest.raises(ReferenceFileError, match=expected):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 0
    assert not (tmp_path / "checkpoint-4").exists()
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


# -- NaN guard (issue 10 item 7) ----------------------------------------------------------------------------------------


def _nan_run(tokenizer, train_dataset, tmp_path, *, stop_on_nonfinite, inject):
    from trl_cpo._trl_compat import REF_CHOSEN_LOGPS
    from trl_cpo.reference import with_columns

    trainer = CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=CPOConfig(
            **cpu_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1),
            stop_on_nonfinite=stop_on_nonfinite,
        ),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.precompute_reference()  # what train() runs first
    if inject == "margin":
        # What an unchecked damaged reference did: one pair's reference log-prob, and so its margin, is NaN
        # (validation bypassed on purpose).
        reference = torch.tensor(trainer.train_dataset[REF_CHOSEN_LOGPS])
        reference[7] = float("nan")
        trainer.train_dataset = with_columns(trainer.train_dataset, {REF_CHOSEN_LOGPS: reference})
    else:
        # A forward that overflows from the third step on (as fp16 can): the margin stays finite, the loss does not.
        def overflow(module, args, output):
            if torch.is_grad_enabled() and trainer.state.global_step >= 2:
                return output * float("inf")

        trainer.model.model.embed_tokens.register_forward_hook(overflow)
    return trainer


def _checkpoint_weights(tmp_path):
    from safetensors.torch import load_file

    return {
        int(p.name.split("-")[1]): load_file(str(p / "model.safetensors"))
        for p in sorted(tmp_path.glob("checkpoint-*"))
    }


@pytest.mark.parametrize("inject, what", [("margin", "reference margin"), ("loss", "loss")])
def test_a_non_finite_step_stops_training_before_any_checkpoint_holds_it(
    tokenizer, train_dataset, tmp_path, inject, what
):
    trainer = _nan_run(tokenizer, train_dataset, tmp_path, stop_on_nonfinite=True, inject=inject)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    failing_step = trainer.state.global_step + 1
    assert f"Non-finite {what}" in message and f"step {failing_step}" in message and "stop_on_nonfinite" in message
    saved = _checkpoint_weights(tmp_path)
    assert sorted(saved) == list(range(1, failing_step)), "every step before the failing one, and none after"
    for step, weights in saved.items():
        assert all(torch.isfinite(w).all() for w in weights.values()), step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("inject", ["margin", "loss"])
def test_with_the_guard_off_trl_behaviour_is_kept(tokenizer, train_dataset, tmp_path, inject):
    trainer = _nan_run(tokenizer, train_dataset, tmp_path, stop_on_nonfinite=False, inject=inject)
    trainer.train()
    saved = _checkpoint_weights(tmp_path)
    assert sorted(saved) == [1, 2, 3, 4]
    assert any(not torch.isfinite(w).all() for w in saved[4].values()), "TRL trains the NaN into the weights"
