"""The training data, loaded as the train script loads it, and checked so that bad input fails with one line.

Loading mirrors the train script (`recipes/cpo_llama3.py`, moving to `trl_cpo.scripts.train`): a `datasets:` mixture
through `trl.get_dataset`, or `--dataset_name` as a `save_to_disk` folder, a local data file (its rows form the
`train` split) or anything `datasets.load_dataset` takes; then `--dataset_train_split`, and the same layout fix
(`drop_redundant_prompt`). The split handed to the trainer is exactly that; the checks below read it without changing
it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from .args import AuditError, AuditSettings

#: File suffixes read with a `datasets` packaged builder (compressed variants such as `.jsonl.gz` too).
LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _builder(path: str) -> str | None:
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return LOCAL_FILE_BUILDERS.get(os.path.splitext(name)[1])


def _load_named(name: str, config: str | None):
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = os.path.expanduser(name)
    if os.path.isdir(path):
        markers = ("dataset_dict.json", "state.json")
        if any(os.path.isfile(os.path.join(path, marker)) for marker in markers):
            try:
                dataset = load_from_disk(path)
            except (OSError, ValueError) as error:
                raise AuditError(
                    f"--dataset_name {name}: could not load this save_to_disk folder ({error})."
                ) from None
            return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})
    elif os.path.isfile(path):
        builder = _builder(path)
        if builder is None:
            raise AuditError(
                f"--dataset_name {name}: unsupported file type. Use one of {sorted(LOCAL_FILE_BUILDERS)} (optionally "
                "compressed, e.g. .jsonl.gz), or a folder written by Dataset.save_to_disk."
            )
        try:
            return load_dataset(builder, data_files=os.path.abspath(path))
        except Exception as error:  # noqa: BLE001 - any reader failure on a user file is a user error
            raise AuditError(
                f"--dataset_name {name}: could not be read as {builder} ({_first_line(error)}). Check that the file "
                "is valid and every row has the same columns and types."
            ) from None
    try:
        return load_dataset(name, name=config)
    except Exception as error:  # noqa: BLE001 - not local: a Hub name that failed to load
        where = "no such file or folder, and " if not os.path.exists(path) else ""
        raise AuditError(
            f"--dataset_name {name}: {where}loading it with datasets.load_dataset failed ({_first_line(error)}). "
            "Pass a local .json/.jsonl/.parquet/.csv file, a save_to_disk folder, or a reachable Hub dataset."
        ) from None


def drop_redundant_prompt(dataset):
    """The train script's layout fix: a string `prompt` next to conversational `chosen` / `rejected` is dropped (TRL
    then takes the shared start of the two conversations as the prompt)."""
    from datasets import Value

    features = dataset.features or {}
    prompt, chosen = features.get("prompt"), features.get("chosen")
    if isinstance(prompt, Value) and prompt.dtype in ("string", "large_string") and chosen is not None:
        if not isinstance(chosen, Value):
            return dataset.remove_columns("prompt")
    return dataset


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
    if mixture.datasets:
        from trl import get_dataset

        try:
            dataset = get_dataset(mixture)
        except Exception as error:  # noqa: BLE001 - a mixture entry that does not load
            raise AuditError(f"datasets: (the --config mixture) failed to load ({_first_line(error)}).") from None
        name = "the datasets: mixture"
    else:
        dataset = _load_named(script.dataset_name, script.dataset_config)
        name = f"--dataset_name {script.dataset_name}"
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
