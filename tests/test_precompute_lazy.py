"""The reference precompute runs when first needed (`trl_cpo.precompute`): every resume refusal comes before it, and a
matching resume runs no reference forward at all.

Construction records what is to be computed; `train()` checks the resume target from the checkpoint's metadata and the
tokenized pairs' digests, takes a valid checkpoint reference as is, and computes what is still pending before the
first step, while the policy is the reference. The attributes users read after construction fill on first read.
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from helpers import cpu_args, make_pairs, sequence_logps

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer, precompute
from trl_cpo.reference_store import REFERENCE_FILE
from trl_cpo.tiny import build_tiny_llama

SAVE = dict(max_steps=2, save_strategy="steps", save_steps=2)


@pytest.fixture
def passes(monkeypatch):
    """The reference passes (`compute_reference_logps` calls) the trainers make, by split size."""
    calls = []
    original = precompute.compute_reference_logps

    def counting(trainer, dataset, **kwargs):
        calls.append(len(dataset))
        return original(trainer, dataset, **kwargs)

    monkeypatch.setattr(precompute, "compute_reference_logps", counting)
    return calls


def build(tokenizer, output_dir, rows, *, seed=0, evals=None, trainer_cls=CPOTrainer, config_cls=CPOConfig, **args):
    return trainer_cls(
        build_tiny_llama(tokenizer, seed=seed),
        args=config_cls(**cpu_args(output_dir, **args)),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=evals,
        processing_class=tokenizer,
    )


@pytest.fixture
def checkpoint(tokenizer, tmp_path):
    rows = make_pairs(16, seed=0)
    evals = {"a": Dataset.from_list(make_pairs(6, seed=1))}
    build(tokenizer, tmp_path / "run", rows, evals=evals, reference_cache=False, **SAVE).train()
    return tmp_path / "run" / "checkpoint-2", rows, evals


def test_construction_runs_no_forward_and_the_attributes_fill_on_first_read(tokenizer, tmp_path, passes):
    trainer = build(tokenizer, tmp_path, make_pairs(8, seed=0), evals=Dataset.from_list(make_pairs(4, seed=1)))
    assert passes == []
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names
    assert trainer.reference_report.num_pairs == 8  # the train set, computed on this read
    assert passes == [8]
    assert len(trainer.eval_reference_logps["eval"]) == 4
    assert passes == [8, 4]
    trainer.train()
    assert passes == [8, 4]  # nothing left to compute


def test_train_scores_every_given_set_before_the_first_step(tokenizer, tmp_path, passes):
    rows, eval_rows = make_pairs(8, seed=0), make_pairs(4, seed=1)
    initial = build_tiny_llama(tokenizer, seed=0)
    # full fine-tuning, no ref_model: the reference is the policy before any step
    trainer = build(tokenizer, tmp_path, rows, evals=Dataset.from_list(eval_rows), learning_rate=1e-2)
    trainer.train()
    assert sorted(passes) == [4, 8]
    (rc, rr), _ = sequence_logps(initial, tokenizer, eval_rows)
    torch.testing.assert_close(trainer.eval_reference_logps["eval"].chosen, rc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trainer.eval_reference_logps["eval"].rejected, rr, rtol=1e-4, atol=1e-4)


def test_a_matching_resume_runs_no_reference_forward(tokenizer, tmp_path, checkpoint, passes):
    folder, rows, evals = checkpoint
    assert (folder / REFERENCE_FILE).is_file()
    resumed = build(tokenizer, tmp_path / "run", rows, evals=evals, reference_cache=False, **{**SAVE, "max_steps": 3})
    resumed.train(resume_from_checkpoint=str(folder))
    assert passes == []  # train and eval set both restored from the checkpoint
    assert resumed.state.global_step == 3
    assert len(resumed.train_reference_logps) == 16 and len(resumed.eval_reference_logps["a"]) == 6


@pytest.mark.parametrize(
    "change, expected",
    [
        ("order", "same training data"),
        ("cpo_gamma", "cpo_gamma: 0.05 in the checkpoint, 0.2 now"),
        ("method", "margin settings"),
    ],
)
def test_every_resume_refusal_comes_before_any_reference_forward(
    tokenizer, tmp_path, checkpoint, passes, change, expected
):
    folder, rows, evals = checkpoint
    kwargs = dict(evals=evals, reference_cache=False, **{**SAVE, "max_steps": 3})
    if change == "order":
        trainer = build(tokenizer, tmp_path / "other", rows[1:] + rows[:1], **kwargs)
    elif change == "cpo_gamma":
        trainer = build(tokenizer, tmp_path / "other", rows, cpo_gamma=0.2, **kwargs)
    else:
        trainer = build(
            tokenizer, tmp_path / "other", rows, trainer_cls=ECPOCTrainer, config_cls=ECPOCConfig, **kwargs
        )
    with pytest.raises(ValueError, match=expected):
        trainer.train(resume_from_checkpoint=str(folder))
    assert passes == []


def test_another_model_on_resume_is_named_without_a_forward(tokenizer, tmp_path, checkpoint, passes, caplog):
    folder, rows, evals = checkpoint
    trainer = build(tokenizer, tmp_path / "run", rows, seed=123, evals=evals, reference_cache=False, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer.train(resume_from_checkpoint=str(folder))
    assert passes == []
    assert any("differs from the one the checkpoint was trained against" in r.getMessage() for r in caplog.records)


def test_an_eval_set_the_checkpoint_lacks_is_computed_at_train_start(tokenizer, tmp_path, checkpoint, passes):
    folder, rows, evals = checkpoint
    new_evals = {**evals, "b": Dataset.from_list(make_pairs(5, seed=7))}
    trainer = build(tokenizer, tmp_path / "run", rows, evals=new_evals, reference_cache=False, max_steps=3)
    trainer.train(resume_from_checkpoint=str(folder))
    assert passes == [5]  # only the new eval set
