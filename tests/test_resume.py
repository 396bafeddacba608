"""Resume bound to its data and settings (issue 10 item 3).

A checkpoint's reference file carries a fingerprint of the tokenized training pairs (row by row, order included) and
the settings that shape the margin. Resuming with other pairs (even with the same completion lengths), the same pairs
in another order, another method or other margin settings is refused with an error that says what differs and how to
proceed; the same data with a rebuilt reference model keeps the drift warning and resumes.
"""

from __future__ import annotations

import json
import logging
import os
import random

import pytest
import torch
from conftest import WORDS, make_pairs
from datasets import Dataset
from helpers import cpu_args

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.reference_store import REFERENCE_FILE, read_reference_metadata
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


# -- checkpoints that survive a kill at any moment (issue 10 item 5) ---------------------------------------------------

KILL_POINTS = ("start", "model", "state", "rename")


@pytest.mark.multiprocess
def test_a_run_killed_at_any_point_of_a_save_resumes_to_the_uninterrupted_weights(model_dir, tmp_path):
    """Real processes, really killed: one child process per point trains CPO (6 steps, checkpoints every 2) and blocks
    at that point of the save of checkpoint-4 until this test kills it with SIGKILL; then a process that trained
    nothing trains an uninterrupted baseline and resumes every killed run with resume_from_checkpoint=True. Every
    resumed run must end on the baseline's weights, bit for bit (fp32 on CPU, no dropout, the Trainer restores RNG and
    data order)."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO, subprocess_env
    from safetensors.torch import load_file

    worker = REPO / "tests" / "scripts" / "resume_worker.py"
    Dataset.from_list(make_pairs(16, seed=0)).save_to_disk(str(tmp_path / "data"))
    spec = {
        "model_dir": model_dir,
        "data_dir": str(tmp_path / "data"),
        "max_steps": 6,
        "save_steps": 2,
        "kill_step": 4,
        "baseline_dir": str(tmp_path / "baseline"),
        "report": str(tmp_path / "report.json"),
        "go_file": str(tmp_path / "go"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    runs = {point: str(tmp_path / f"killed-at-{point}") for point in KILL_POINTS}
    targets = [f"{run_dir}:{point}" for point, run_dir in runs.items()]
    process = subprocess.Popen(
        [sys.executable, str(worker), str(tmp_path / "spec.json"), *targets],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        for point, run_dir in runs.items():
            while not os.path.exists(run_dir + ".blocked"):
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"{point}: never reached its point:\n{process.communicate()[0][-5000:]}")
                time.sleep(0.2)
            os.kill(int(open(run_dir + ".blocked").read()), signal.SIGKILL)
        # What each kill left (the blocked children write nothing more; the resumes below rewrite some folders).
        checkpoint = {point: os.path.join(run_dir, "checkpoint-4") for point, run_dir in runs.items()}
        listing = {
            point: sorted(os.listdir(path)) if os.path.isdir(path) else [] for point, path in checkpoint.items()
        }
        (tmp_path / "go").touch()
        output, _ = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-5000:]

    assert "model.safetensors" not in listing["start"] and REFERENCE_FILE not in listing["start"]
    assert "model.safetensors" in listing["model"] and "trainer_state.json" not in listing["model"]
    assert "trainer_state.json" in listing["state"] and REFERENCE_FILE not in listing["state"]
    assert REFERENCE_FILE not in listing["rename"] and any(n.endswith(".tmp") for n in listing["rename"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(report[run_dir]["child_signal"] == signal.SIGKILL for run_dir in runs.values()), report
    baseline = load_file(os.path.join(spec["baseline_dir"], "final.safetensors"))
    assert report[spec["baseline_dir"]]["steps"] == [1, 2, 3, 4, 5, 6]
    for point, run_dir in runs.items():
        result = report[run_dir]
        assert "error" not in result, (point, result)
        warnings = " ".join(result["warnings"])
        if point in ("start", "model"):
            # resumed from checkpoint-2 (steps 3..6 trained again); a half-written checkpoint-4 is named as skipped
            assert result["steps"][-4:] == [3, 4, 5, 6], (point, result)
            if point == "model":
                assert "checkpoint-4" in warnings and "incomplete" in warnings, (point, warnings)
        else:
            # resumed from checkpoint-4, whose reference file was not written: recomputed from the model, with a warning
            assert result["steps"][-2:] == [5, 6], (point, result)
            assert REFERENCE_FILE in warnings and "recomputed" in warnings, (point, warnings)
        final = load_file(os.path.join(run_dir, "final.safetensors"))
        for name, value in baseline.items():
            assert torch.equal(final[name], value), (point, name, (final[name] - value).abs().max())


def _folder(root, name, *files):
    # Readable files (a checkpoint's trainer_state.json and weights are parsed when it is chosen).
    from safetensors.torch import save_file

    path = root / name
    path.mkdir()
    for file in files:
        if file.endswith(".safetensors"):
            save_file({"w": torch.zeros(1)}, str(path / file))
        else:
            (path / file).write_text("{}" if file.endswith(".json") else "x")
    return str(path)


def test_resume_true_takes_the_newest_complete_checkpoint_and_names_the_skipped_ones(tmp_path, caplog):
    from trl_cpo.checkpoints import last_complete_checkpoint

    _folder(tmp_path, "checkpoint-2", "model.safetensors", "trainer_state.json", REFERENCE_FILE)
    _folder(tmp_path, "checkpoint-10", REFERENCE_FILE)  # the repro: only the reference file
    _folder(tmp_path, "checkpoint-6", "model.safetensors", "optimizer.pt")  # killed before trainer_state.json
    _folder(tmp_path, "checkpoint-4", "adapter_model.safetensors", "trainer_state.json")  # complete (PEFT)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    message = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "checkpoint-10 (it has no model weights" in message and "checkpoint-6 (it has no trainer_state.json" in message
    )


def test_resume_true_with_only_incomplete_checkpoints_says_so(tmp_path):
    from trl_cpo.checkpoints import last_complete_checkpoint

    _folder(tmp_path, "checkpoint-2", REFERENCE_FILE)
    with pytest.raises(
        ValueError, match="no checkpoint in .* is complete: .*checkpoint-2.*without resume_from_checkpoint"
    ):
        last_complete_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="has no checkpoint-N folder"):
        last_complete_checkpoint(str(tmp_path / "empty"))


def test_an_explicit_incomplete_checkpoint_is_refused_before_training(tokenizer, train_dataset, tmp_path):
    """Without this, the Trainer loads the half-saved weights, then fails on the missing trainer_state.json with a bare
    FileNotFoundError that says nothing of an interrupted save."""
    folder = _folder(tmp_path, "checkpoint-4", "model.safetensors", "optimizer.pt")
    trainer = CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=CPOConfig(**cpu_args(tmp_path, max_steps=2)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="checkpoint-4: it has no trainer_state.json.*resume_from_checkpoint=True"):
        trainer.train(resume_from_checkpoint=folder)
    assert trainer.state.global_step == 0


def test_older_checkpoints_are_deleted_only_once_the_new_one_holds_its_reference(
    tokenizer, train_dataset, tmp_path, monkeypatch
):
    import transformers.trainer as trainer_module

    seen = []
    original = trainer_module.rotate_checkpoints

    def record(output_dir, *args, **kwargs):
        newest = max(
            os.listdir(output_dir), key=lambda name: int(name.split("-")[-1]) if "checkpoint-" in name else -1
        )
        seen.append((newest, sorted(os.listdir(os.path.join(output_dir, newest)))))
        return original(output_dir, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "rotate_checkpoints", record)
    CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=CPOConfig(**cpu_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    ).train()
    assert [name for name, _ in seen] == ["checkpoint-1", "checkpoint-2"]
    assert all(REFERENCE_FILE in files and "trainer_state.json" in files for _, files in seen), seen
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
