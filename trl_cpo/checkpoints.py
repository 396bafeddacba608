"""Checkpoint folders that survive a kill: which ones are complete, and where the reference file goes in a save.

`transformers.Trainer._save_checkpoint` writes a `checkpoint-N` folder in this order: model files, optimizer /
scheduler / scaler / RNG states, `trainer_state.json`, then (with `push_to_hub`) the upload of the folder, then the
deletion of old checkpoints beyond `save_total_limit`. The CPO / E-CPOC trainers add their reference file last,
atomically, right after `trainer_state.json` and so before the upload and the deletion (`write_after_trainer_state`),
so:

- a folder with `trainer_state.json` and model weights is complete (the Trainer wrote the state after everything
  else); `complete_checkpoint_problem` says what an incomplete one lacks;
- `resume_from_checkpoint=True` goes to the newest complete folder (`last_complete_checkpoint`) and names the
  incomplete ones it skipped, instead of failing on (or silently restarting from) a folder a kill left half written;
- a complete folder without the reference file is a kill in the instant between the state and that file (or a file
  the user deleted): it resumes with the reference recomputed from the model, with a warning.

The second half binds a checkpoint's reference file to its run (`reference_metadata`, written with the file) and
restores it on resume (`restore_reference`), refusing another run's data or margin settings
(`check_checkpoint_binding`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open

from ._trl_compat import REFERENCE_COLUMNS
from .data import describe_pair_difference, fingerprint, pair_digests
from .precompute import reference_weights
from .reference import ReferenceLogps
from .reference_store import (
    REFERENCE_FILE,
    ReferenceFileError,
    checkpoint_reference_path,
    load_reference_file,
    save_reference_checkpoint,
)

logger = logging.getLogger(__name__)

#: Written by `transformers.Trainer` after the model and optimizer files (`transformers.trainer.TRAINER_STATE_NAME`).
TRAINER_STATE_FILE = "trainer_state.json"
#: Model weight files `transformers.Trainer._load_from_checkpoint` can resume from (full model, sharded, PEFT adapter).
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
#: FSDP (`pytorch_model_fsdp*`, `transformers.trainer.FSDP_MODEL_NAME`) and DeepSpeed (`global_step*`) weight entries.
MODEL_WEIGHT_PREFIXES = ("pytorch_model_fsdp", "global_step")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
#: The optimizer's state in a checkpoint (`transformers.trainer.OPTIMIZER_NAME`, its safetensors form; DeepSpeed keeps
#: it in its `global_step*` folder).
OPTIMIZER_STATES = ("optimizer.pt", "optimizer.bin", "optimizer.safetensors")


def _has_model_weights(folder: str) -> bool:
    entries = os.listdir(folder)
    if any(name in MODEL_WEIGHT_FILES or name.startswith(MODEL_WEIGHT_PREFIXES) for name in entries):
        return True
    # Several PEFT adapters are saved one per sub-folder.
    return any(
        os.path.isfile(os.path.join(folder, name, weights))
        for name in entries
        if os.path.isdir(os.path.join(folder, name))
        for weights in MODEL_WEIGHT_FILES
    )


def complete_checkpoint_problem(folder: str) -> str | None:
    """What `folder` lacks to be resumed from (None if complete): its model weights or `trainer_state.json`, or one
    of them unreadable (empty or truncated, e.g. by a full disk or a copy that did not finish)."""
    if not os.path.isdir(folder):
        return "it does not exist"
    if not _has_model_weights(folder):
        return "it has no model weights (the save was interrupted before or while writing them)"
    state = os.path.join(folder, TRAINER_STATE_FILE)
    if not os.path.isfile(state):
        return f"it has no {TRAINER_STATE_FILE} (the save was interrupted before its end)"
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError) as error:
        return (
            f"its {TRAINER_STATE_FILE} is unreadable ({type(error).__name__}: {str(error)[:80]}; empty or truncated)"
        )
    for name in ("model.safetensors", "adapter_model.safetensors"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                return f"its {name} is unreadable ({type(error).__name__}: {str(error)[:80]}; empty or truncated)"
    return None


def foreign_checkpoint_problem(trainer, folder: str) -> str | None:
    """Whether `folder` was written by another trainer than `trainer`'s method, read from its log history (no
    forward, no pickle): None when it is this method's, or when its history holds no training log to tell."""
    with open(os.path.join(folder, TRAINER_STATE_FILE)) as f:
        history = json.load(f).get("log_history", [])
    steps = [entry for entry in history if "loss" in entry and "train_runtime" not in entry]
    if not steps:
        return None
    if not any("u_fraction" in entry for entry in steps):
        return "it was written by a plain trl.DPOTrainer run (its logs have DPO's metrics and no u_fraction)"
    metric = trainer.method.metric_name
    if not any(metric in entry for entry in steps):
        return f"it was written by another trl-cpo method's run (its logs carry no {metric}, which {trainer.method.title} logs)"
    return None


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest complete `checkpoint-N` folder of `output_dir`, for `resume_from_checkpoint=True`.

    Incomplete folders (a save killed half-way) are skipped with a warning naming them. Raises `ValueError` when
    there is no complete checkpoint.
    """
    folders = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = _CHECKPOINT_NAME.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                folders.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, folder in sorted(folders, reverse=True):
        problem = complete_checkpoint_problem(folder)
        if problem is None:
            if skipped:
                logger.warning(
                    "resume_from_checkpoint=True: skipping incomplete checkpoint(s) %s; resuming from %s.",
                    "; ".join(skipped),
                    folder,
                )
            return folder
        skipped.append(f"{folder} ({problem})")
    if skipped:
        raise ValueError(
            f"resume_from_checkpoint=True, but no checkpoint in {output_dir} is complete: {'; '.join(skipped)}. "
            "Their saves were interrupted. Start the run again without resume_from_checkpoint (delete these "
            "folders first, or use another output_dir)."
        )
    raise ValueError(
        f"resume_from_checkpoint=True, but {output_dir} has no checkpoint-N folder. Start the run without "
        "resume_from_checkpoint, or pass the path of a checkpoint folder."
    )


@contextlib.contextmanager
def write_after_trainer_state(trainer, folder: str, write: Callable[[], None]) -> Iterator[None]:
    """Inside `trainer._save_checkpoint`, run `write()` right after `trainer_state.json` is written into `folder`.

    Relies on the order of `Trainer._save_checkpoint` (transformers/trainer.py), here only: model files, optimizer /
    scheduler / scaler / RNG states, then `self.state.save_to_json(<folder>/trainer_state.json)` on the process that
    saves (the last file the Trainer writes), then `self._push_from_checkpoint(<folder>)` with `push_to_hub`, then the
    deletion of old checkpoints beyond `save_total_limit`. Wrapping the state's public `save_to_json` for the duration
    of one save puts `write` after every other file of the checkpoint and before both the upload and the deletion of
    older checkpoints. If a later transformers stops calling it, `write` does not run here and the caller writes once
    `_save_checkpoint` returns (still a complete folder, only no longer before the upload).
    """
    state = trainer.state
    own = vars(state).get("save_to_json")  # a wrapper someone put on this instance stays in place afterwards
    original = state.save_to_json
    target = os.path.abspath(folder)

    def save_to_json(json_path, *args, **kwargs):
        result = original(json_path, *args, **kwargs)
        if os.path.dirname(os.path.abspath(json_path)) == target:
            write()
        return result

    state.save_to_json = save_to_json
    try:
        yield
    finally:
        if own is None:
            del state.save_to_json
        else:
            state.save_to_json = own


# -- a checkpoint's reference, bound to its run ------------------------------------------------------------------------


def reference_metadata(trainer, splits: dict[str, ReferenceLogps]) -> dict[str, object]:
    """What binds a checkpoint's reference file to its run: the method, its settings, the margin settings, a
    fingerprint of each split's pairs, and the digest of the reference weights."""
    return {
        "method": trainer.method.name,
        "settings": trainer.method.settings(trainer.args),
        "margin_settings": trainer._margin_settings(),
        "fingerprints": {
            name: fingerprint(reference.row_digests)
            for name, reference in splits.items()
            if reference.row_digests is not None
        },
        "reference_weights": trainer.reference_weights,
    }


def check_checkpoint_binding(trainer, checkpoint: str, saved: ReferenceLogps, metadata: dict) -> None:
    """Refuse a resume whose train pairs (token ids, order) or margin settings differ from the checkpoint's.

    The pairs are compared through their digests (`trl_cpo.data.pair_digests`, computed from the tokenized train set,
    no forward). A file written before digests existed is compared by count and completion lengths, which needs this
    run's reference log-probs.
    """
    problems = []
    if saved.row_digests is not None:
        difference = describe_pair_difference(saved.row_digests, pair_digests(trainer.train_dataset))
    else:
        logger.warning(
            "Checkpoint %s predates data fingerprints: only the number of pairs and their completion lengths can "
            "be compared with this train_dataset (which needs its reference log-probs computed).",
            checkpoint,
        )
        current = trainer.train_reference_logps
        difference = (
            None
            if saved.same_pairs(current)
            else (f"trained on {len(saved)} pairs whose completion lengths differ from these {len(current)}")
        )
    if difference:
        problems.append(f"data: {difference} (pairs counted after TRL's tokenization and max_length filter)")
    saved_settings = metadata.get("margin_settings")
    if isinstance(saved_settings, dict):
        now = json.loads(json.dumps(trainer._margin_settings()))  # the form the file stores (tuples become lists)
        changed = [
            f"{key}: {saved_settings[key]!r} in the checkpoint, {now[key]!r} now"
            for key in now
            if key in saved_settings and saved_settings[key] != now[key]
        ]
        if changed:
            problems.append("margin settings: " + "; ".join(changed))
    if problems:
        raise ValueError(
            f"Cannot resume from {checkpoint}: its reference margins belong to another run. "
            + " ".join(f"[{problem}]" for problem in problems)
            + ". Resuming would apply the checkpoint's per-pair margins to other pairs or under other settings. "
            "To proceed, either resume with the same training data (the same rows in the same order, tokenizer "
            "and max_length) and the same margin settings as the run that wrote the checkpoint, or start a new "
            "run: drop resume_from_checkpoint, or use another output_dir."
        )


def restore_reference(trainer, checkpoint: str) -> None:
    """Train (and evaluate) against the reference log-probs the checkpoint was trained with, with no reference
    forward: everything is checked from the file and the tokenized pairs first."""
    path = checkpoint_reference_path(checkpoint)
    saved, metadata = load_reference_file(path)
    if "train" not in saved:
        raise ReferenceFileError(path, f"it holds no 'train' split (its splits: {list(saved)})")
    train = saved.pop("train")
    check_checkpoint_binding(trainer, checkpoint, train, metadata)
    trainer._restore_chosen_settings(metadata.get("settings", {}), checkpoint)
    saved_weights, weights = metadata.get("reference_weights"), reference_weights(trainer)
    if None not in (saved_weights, weights) and saved_weights != weights:
        logger.warning(
            "The model given to this trainer differs from the one the checkpoint was trained against (%s: weights "
            "digest %s, now %s); resuming with the checkpoint's reference log-probs and margins, without a reference "
            "pass. Pass the model the run started from to score new eval data against the same reference.",
            checkpoint,
            saved_weights[:12],
            weights[:12],
        )
    trainer.reference_weights = saved_weights or weights
    if train.row_digests is None:
        train.row_digests = pair_digests(trainer.train_dataset)
    trainer.set_train_reference(train, chosen_settings=False)
    for key, reference in saved.items():
        name = key.removeprefix("eval/")
        dataset = eval_dataset_named(trainer, name)
        if dataset is None or not _same_pairs(reference, dataset):
            logger.warning("Eval set %r of the checkpoint is not among this trainer's; left to be computed.", name)
            continue
        trainer.set_eval_reference(name, reference)


def _same_pairs(reference: ReferenceLogps, dataset) -> bool:
    if reference.row_digests is None:
        return False
    stale = [c for c in REFERENCE_COLUMNS if c in dataset.column_names]
    return torch.equal(reference.row_digests, pair_digests(dataset.remove_columns(stale) if stale else dataset))


def eval_dataset_named(trainer, name: str):
    if isinstance(trainer.eval_dataset, dict):
        return trainer.eval_dataset.get(name)
    return trainer.eval_dataset if name == "eval" else None


def save_reference(trainer, folder: str) -> None:
    if trainer.args.should_save and trainer.train_reference_logps is not None and os.path.isdir(folder):
        evals = {f"eval/{name}": reference for name, reference in trainer.eval_reference_logps.items()}
        splits = {"train": trainer.train_reference_logps, **evals}
        save_reference_checkpoint(folder, splits, metadata=reference_metadata(trainer, splits))


def prepare_resume(trainer, resume_from_checkpoint):
    """The checkpoint `train(resume_from_checkpoint=...)` resumes from (`True`: the newest complete one, the skipped
    ones named), with the trainer set to train against that checkpoint's reference (`restore_reference`)."""
    if resume_from_checkpoint is True:
        # Resolved here rather than by the Trainer, whose choice (the highest step) may be a folder a kill left
        # incomplete: the newest complete one is taken, and the skipped ones are named.
        resume_from_checkpoint = last_complete_checkpoint(trainer.args.output_dir)
    if not (isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint)):
        return resume_from_checkpoint
    problem = complete_checkpoint_problem(resume_from_checkpoint)
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {resume_from_checkpoint}: {problem}. Pass an earlier checkpoint, or "
            "resume_from_checkpoint=True, which takes the newest complete one."
        )
    has_reference = os.path.isfile(checkpoint_reference_path(resume_from_checkpoint))
    # A checkpoint with its reference file is one of ours: the file's metadata names its method and settings more
    # precisely (restore_reference). Without one, the log history tells another trainer's checkpoint.
    foreign = None if has_reference else foreign_checkpoint_problem(trainer, resume_from_checkpoint)
    if foreign is not None:
        raise ValueError(
            f"Cannot resume from {resume_from_checkpoint} with {type(trainer).__name__}: {foreign}. Resuming would "
            f"continue that run, its optimizer state and schedule, under {trainer.method.title}'s loss. Either start "
            f"a new run from its weights (pass {resume_from_checkpoint} as the model, without "
            "resume_from_checkpoint), or resume it with the trainer that wrote it."
        )
    entries = os.listdir(resume_from_checkpoint)
    if not any(name in OPTIMIZER_STATES or name.startswith("global_step") for name in entries):
        logger.warning(
            "Checkpoint %s has no optimizer state (optimizer.pt): the optimizer restarts from scratch (Adam's moments "
            "at zero), so the steps after this resume differ from an uninterrupted run's.",
            resume_from_checkpoint,
        )
    if trainer.args.precompute_ref_log_probs:  # a live reference has no reference file to restore
        if has_reference:
            restore_reference(trainer, resume_from_checkpoint)
        else:
            logger.warning(
                "Checkpoint %s has no %s (its save was interrupted just before that last file, or it was "
                "deleted): the reference log-probs are recomputed from the model given to this trainer, and "
                "the pairs cannot be checked against the checkpoint's. Pass the model the run started from to "
                "get the same margins.",
                resume_from_checkpoint,
                REFERENCE_FILE,
            )
    return resume_from_checkpoint
