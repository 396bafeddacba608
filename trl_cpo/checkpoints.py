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
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

from ._config_utils import logger

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
    """What `folder` lacks to be resumed from (None if complete): its model weights, or `trainer_state.json`."""
    if not os.path.isdir(folder):
        return "it does not exist"
    if not _has_model_weights(folder):
        return "it has no model weights (the save was interrupted before or while writing them)"
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_FILE)):
        return f"it has no {TRAINER_STATE_FILE} (the save was interrupted before its end)"
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
