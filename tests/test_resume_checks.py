"""Resume from what is not ours, or not whole (issue 18, item 4): named before any reference forward, with the choice.

A DPOTrainer checkpoint (or another method's) is refused with the two ways forward; an unreadable trainer_state.json or
weights file in the newest checkpoint makes `resume_from_checkpoint=True` take the previous complete one, with a
warning; a checkpoint without its optimizer state resumes with a warning.
"""

from __future__ import annotations

import logging
import os

import pytest
from datasets import Dataset
from helpers import cpu_args, make_pairs
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer, precompute
from trl_cpo.tiny import build_tiny_llama

SAVE = dict(max_steps=2, save_strategy="steps", save_steps=1)


@pytest.fixture
def passes(monkeypatch):
    calls = []
    original = precompute.compute_reference_logps
    monkeypatch.setattr(precompute, "compute_reference_logps", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def cpo(tokenizer, output_dir, rows, ref_model=None, **overrides):
    args = CPOConfig(**cpu_args(output_dir, **{**SAVE, "max_steps": 3, **overrides}))
    return CPOTrainer(
        build_tiny_llama(tokenizer),
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def test_a_dpo_trainer_checkpoint_is_named_with_both_ways_forward(tokenizer, tmp_path, passes):
    rows = make_pairs(8, seed=0)
    DPOTrainer(
        build_tiny_llama(tokenizer),
        args=DPOConfig(**cpu_args(tmp_path, **SAVE), precompute_ref_log_probs=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train()
    trainer = cpo(tokenizer, tmp_path, rows)
    with pytest.raises(ValueError, match="plain trl.DPOTrainer run") as info:
        trainer.train(resume_from_checkpoint=True)
    message = str(info.value)
    assert "start a new run from its weights" in message and "resume it with the trainer that wrote it" in message
    assert passes == [] and trainer.state.global_step == 0


def test_another_methods_checkpoint_is_named(tokenizer, tmp_path, passes):
    rows = make_pairs(8, seed=0)
    args = ECPOCConfig(**cpu_args(tmp_path, **SAVE), precompute_ref_log_probs=False)
    ECPOCTrainer(
        build_tiny_llama(tokenizer),
        ref_model=build_tiny_llama(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train()
    trainer = cpo(tokenizer, tmp_path, rows, ref_model=build_tiny_llama(tokenizer), precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="another trl-cpo method's run .*cpo_margin"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("damaged", ["trainer_state.json", "model.safetensors"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tokenizer, tmp_path, caplog, damaged):
    rows = make_pairs(8, seed=0)
    cpo(tokenizer, tmp_path, rows, max_steps=2).train()
    path = tmp_path / "checkpoint-2" / damaged
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    explicit = cpo(tokenizer, tmp_path, rows)
    with pytest.raises(ValueError, match=f"its {damaged} is unreadable"):
        explicit.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    trainer = cpo(tokenizer, tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    warning = next(r.getMessage() for r in caplog.records if "skipping incomplete" in r.getMessage())
    assert "checkpoint-2" in warning and f"{damaged} is unreadable" in warning and "checkpoint-1" in warning


def test_a_missing_optimizer_state_is_named(tokenizer, tmp_path, caplog):
    rows = make_pairs(8, seed=0)
    cpo(tokenizer, tmp_path, rows, max_steps=2).train()
    os.remove(tmp_path / "checkpoint-2" / "optimizer.pt")
    trainer = cpo(tokenizer, tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer.train(resume_from_checkpoint=True)
    assert any("no optimizer state (optimizer.pt)" in r.getMessage() for r in caplog.records)
