"""Resume bound to its data and settings (issue 10 item 3).

A checkpoint's reference file carries a fingerprint of the tokenized training pairs (row by row, order included) and
the settings that shape the margin. Resuming with other pairs (even with the same completion lengths), the same pairs
in another order, another method or other margin settings is refused with an error that says what differs and how to
proceed; the same data with a rebuilt reference model keeps the drift warning and resumes.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from conftest import WORDS, make_pairs
from datasets import Dataset
from helpers import cpu_args

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.reference import read_reference_metadata
from trl_cpo.tiny import build_tiny_llama

SAVE = dict(max_steps=2, save_strategy="steps", save_steps=2)


def same_lengths_other_words(rows, seed=11):
    """Other pairs whose prompts and completions tokenize to exactly as many tokens (one word = one token): the case
    a length-only check cannot tell apart (one-word or multiple-choice answers)."""
    rng = random.Random(seed)

    def swap(text):
        lead = " " if text.startswith(" ") else ""
        return lead + " ".join(rng.choice([w for w in WORDS if w != word]) for word in text.split())

    return [{"prompt": r["prompt"], "chosen": swap(r["chosen"]), "rejected": swap(r["rejected"])} for r in rows]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A CPO run of 2 steps on 16 pairs, saved at step 2."""
    output_dir = tmp_path_factory.mktemp("first-run")
    rows = make_pairs(16, seed=0)
    CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=CPOConfig(**cpu_args(output_dir, **SAVE)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train()
    return output_dir / "checkpoint-2", rows


def resume(tokenizer, checkpoint, rows, tmp_path, trainer_cls=CPOTrainer, config_cls=CPOConfig, seed=0, **overrides):
    trainer = trainer_cls(
        model=build_tiny_llama(tokenizer, seed=seed),
        args=config_cls(**cpu_args(tmp_path, **{**SAVE, "max_steps": 3, "save_strategy": "no", **overrides})),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_the_checkpoint_carries_the_fingerprint_and_the_margin_settings(checkpoint):
    folder, _ = checkpoint
    metadata = read_reference_metadata(str(folder))
    assert len(metadata["fingerprints"]["train"]) == 64  # sha256 of the per-pair digests, in order
    settings = metadata["margin_settings"]
    assert settings["method"] == "cpo" and settings["beta"] == CPOConfig.beta and settings["max_length"] == 1024
    assert {"cpo_gamma", "cpo_margin_type", "cpo_max_margin", "loss_type", "truncation_mode"} <= set(settings)


def test_other_pairs_with_the_same_completion_lengths_are_refused(checkpoint, tokenizer, tmp_path):
    folder, rows = checkpoint
    other = same_lengths_other_words(rows)
    lengths = [[len(tokenizer(r[k])["input_ids"]) for k in ("prompt", "chosen", "rejected")] for r in rows]
    assert lengths == [[len(tokenizer(r[k])["input_ids"]) for k in ("prompt", "chosen", "rejected")] for r in other]
    with pytest.raises(ValueError) as info:
        resume(tokenizer, folder, other, tmp_path)
    message = str(info.value)
    assert str(folder) in message
    assert "16 of 16 pairs differ (first at row 0)" in message
    assert "same training data" in message and "output_dir" in message


def test_a_single_changed_pair_is_named(checkpoint, tokenizer, tmp_path):
    folder, rows = checkpoint
    other = [dict(r) for r in rows]
    other[5] = same_lengths_other_words([rows[5]])[0]
    with pytest.raises(ValueError, match=r"1 of 16 pairs differ \(first at row 5\)"):
        resume(tokenizer, folder, other, tmp_path)


def test_the_same_pairs_in_another_order_are_refused(checkpoint, tokenizer, tmp_path):
    folder, rows = checkpoint
    shuffled = rows[1:] + rows[:1]
    with pytest.raises(ValueError, match=r"same 16 pairs in another order \(first moved: row 0\)"):
        resume(tokenizer, folder, shuffled, tmp_path)


def test_fewer_pairs_are_refused_with_both_counts(checkpoint, tokenizer, tmp_path):
    folder, rows = checkpoint
    with pytest.raises(ValueError, match="trained on 16 pairs; this train_dataset has 12"):
        resume(tokenizer, folder, rows[:12], tmp_path)


def test_another_method_is_refused(checkpoint, tokenizer, tmp_path):
    folder, rows = checkpoint
    with pytest.raises(ValueError) as info:
        resume(tokenizer, folder, rows, tmp_path, trainer_cls=ECPOCTrainer, config_cls=ECPOCConfig)
    message = str(info.value)
    assert "method: 'cpo' in the checkpoint, 'ecpoc' now" in message
    assert "new run" in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"beta": 1.0}, "beta: 2.5 in the checkpoint, 1.0 now"),
        ({"max_length": 12}, "max_length: 1024 in the checkpoint, 12 now"),
        ({"loss_type": ["sigmoid"]}, "loss_type: ['sigmoid_norm'] in the checkpoint, ['sigmoid'] now"),
        ({"cpo_gamma": 0.2}, "cpo_gamma: 0.05 in the checkpoint, 0.2 now"),
    ],
)
def test_other_margin_settings_are_refused_and_named(checkpoint, tokenizer, tmp_path, overrides, expected):
    folder, rows = checkpoint
    with pytest.raises(ValueError, match="margin settings") as info:
        resume(tokenizer, folder, rows, tmp_path, **overrides)
    assert expected in str(info.value)


def test_same_data_with_a_rebuilt_reference_resumes_with_the_drift_warning(checkpoint, tokenizer, tmp_path, caplog):
    folder, rows = checkpoint
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer = resume(tokenizer, folder, rows, tmp_path, seed=123)  # another init: another reference
    assert trainer.state.global_step == 3
    assert any("differs from the one the checkpoint was trained against" in r.message for r in caplog.records)


def test_settings_that_do_not_shape_the_margin_may_change(checkpoint, tokenizer, tmp_path):
    folder, rows = checkpoint
    trainer = resume(tokenizer, folder, rows, tmp_path, learning_rate=5e-4, precompute_ref_batch_size=3)
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_checkpoint_written_before_fingerprints_still_resumes_with_a_warning(
    checkpoint, tokenizer, tmp_path, caplog
):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from trl_cpo.reference import REFERENCE_FILE

    folder, rows = checkpoint
    old = shutil.copytree(folder, tmp_path / "old-checkpoint-2")
    path = str(old / REFERENCE_FILE)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("row_digests")}
        header = dict(f.metadata())
    header["trl_cpo"] = json.dumps({k: v for k, v in json.loads(header["trl_cpo"]).items() if k == "settings"})
    save_file(tensors, path, metadata=header)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer = resume(tokenizer, old, rows, tmp_path)
    assert trainer.state.global_step == 3
    assert any("predates data fingerprints" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="completion lengths differ"):
        resume(tokenizer, old, rows[1:] + rows[:1], tmp_path)
