"""The training data, loaded by the train script's own loader, and checked so that bad input fails with one line.

`trl_cpo.dataset_loading.load_datasets` reads a `datasets:` mixture (`trl.get_dataset`) or `--dataset_name` (a
`save_to_disk` folder, a local data file whose rows form the `train` split, or anything `datasets.load_dataset` takes);
then `--dataset_train_split` and the same layout fix (`drop_redundant_prompt`). The split handed to the trainer is
exactly training's; the checks below read it without changing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from trl_cpo.dataset_loading import DatasetFileError, drop_redundant_prompt, load_datasets

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
    except DatasetFileError as error:  # names the file and line, and the fix
        raise AuditError(str(error)) from None
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


def check_pairs(dataset, name: str) -> list[str]:
    """The trainers' own checks (`trl_cpo.data.validate_preference_dataset`): what training would refuse, the audit
    refuses with the same message (`AuditError`). Returns notes to print (none today). `dataset` is not modified."""
    from trl_cpo.data import validate_preference_dataset

    try:
        validate_preference_dataset(dataset, name)
    except ValueError as error:
        raise AuditError(str(error)) from None
    return []
