"""The training data, loaded by the train script's own loader, and checked so that bad input fails with one line.

`trl_cpo.scripts.train.load_datasets` reads a `datasets:` mixture (`trl.get_dataset`) or `--dataset_name` (a
`save_to_disk` folder, a local data file whose rows form the `train` split, or anything `datasets.load_dataset` takes);
then `--dataset_train_split` and the same layout fix (`drop_redundant_prompt`). The split handed to the trainer is
exactly training's; the checks below read it without changing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from trl_cpo.scripts.train import drop_redundant_prompt, load_datasets

from .args import AuditError, AuditSettings


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:300]


@contextlib.contextmanager
def _quiet_datasets_errors():
    """`datasets` logs a reader failure at ERROR level before raising it; the audit reports it once, as one line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_train_split(settings: AuditSettings):
    """The train split training would read (first `--max_samples` pairs if set)."""
    with _quiet_datasets_errors():
        return _load_train_split(settings)


def _load_train_split(settings: AuditSettings):
    script, mixture = settings.script, settings.datasets
    name = "the datasets: mixture" if mixture.datasets else f"--dataset_name {script.dataset_name}"
    try:
        dataset = load_datasets(script, mixture)
    except Exception as error:  # noqa: BLE001 - any reader failure on the user's data is a user error
        missing = not mixture.datasets and not os.path.exists(os.path.expanduser(script.dataset_name))
        where = "no such file or folder, and as a Hub dataset it " if missing else ""
        raise AuditError(
            f"{name}: {where}could not be loaded ({_first_line(error)}). Pass a valid local .json/.jsonl/.parquet/.csv "
            "file, a save_to_disk folder, or a reachable Hub dataset."
        ) from None
    split = script.dataset_train_split
    if split not in dataset:
        raise AuditError(
            f"{name} has no split {split!r}; its splits are {sorted(dataset)}. Choose one with --dataset_train_split."
        )
    train = drop_redundant_prompt(dataset[split])
    if settings.audit.max_samples is not None:
        train = train.select(range(min(settings.audit.max_samples, len(train))))
    for note in check_pairs(train, name):
        print(f"note: {note}", file=sys.stderr)
    return train


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        for key in ("content", "text"):
            if key in value:
                return _is_empty(value[key])
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_empty(item) for item in value)
    return False


def _rows(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices[:10]) + (", ..." if len(indices) > 10 else "")


def check_pairs(dataset, name: str) -> list[str]:
    """Columns present and values of the right type (`AuditError` naming the column and rows otherwise); returns
    notes on empty completions (after splitting off an implicit prompt as TRL does). `dataset` is not modified."""
    from trl.data_utils import extract_prompt

    if len(dataset) == 0:
        raise AuditError(f"{name} has no rows in its train split.")
    missing = [column for column in ("chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise AuditError(
            f"{name} has no column {' or '.join(repr(c) for c in missing)} (its columns: {dataset.column_names}). A "
            "preference dataset needs 'chosen' and 'rejected' (and optionally 'prompt'); rename the columns that hold "
            "the preferred and dispreferred responses, e.g. dataset.rename_column('response_a', 'chosen')."
        )
    for column in ("prompt", "chosen", "rejected"):
        if column not in dataset.column_names:
            continue
        bad = [i for i, value in enumerate(dataset[column]) if not isinstance(value, (str, list))]
        if bad:
            raise AuditError(
                f"{name}: column {column!r} holds {type(dataset[column][bad[0]]).__name__} values at row(s) "
                f"{_rows(bad)}; it must hold text or a list of {{'role', 'content'}} messages. Fix or drop those rows."
            )
    view = dataset if "prompt" in dataset.column_names else dataset.map(extract_prompt, desc="Checking pairs")
    notes = []
    for column in ("chosen", "rejected"):
        empty = [i for i, value in enumerate(view[column]) if _is_empty(value)]
        if empty:
            # Training takes them (TRL scores the eos token alone), so the audit does too, and says so.
            notes.append(
                f"{name}: column {column!r} has {len(empty)} empty completion(s) after the prompt, at row(s) "
                f"{_rows(empty)}; they are scored as the eos token alone, as training will score them. Drop them if "
                f"that is not intended, e.g. dataset.filter(lambda row: row[{column!r}])."
            )
    return notes
