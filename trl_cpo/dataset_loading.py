"""Loading the preference data a TRL-style script names: `trl-cpo train` and `trl-cpo audit` read it through here.

The arguments are TRL's own (`trl.ScriptArguments` and `trl.DatasetMixtureConfig`): a `datasets:` mixture is read with
`trl.get_dataset`; `--dataset_name` takes a Hub dataset, a local JSON / JSON-lines / Parquet / CSV / Arrow file (its
rows form the 'train' split; `.gz`, `.bz2`, `.xz`, `.zst`, `.lz4` compression allowed), or a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`. `split` then takes one split and brings it into a layout TRL 1.16
accepts (`drop_redundant_prompt`). Text that is not valid UTF-8 is refused with `DatasetFileError`, which names the
file and line (local JSON / CSV files) or the split, column and row, and says to re-encode the data as UTF-8.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

#: File suffixes loaded with a `datasets` packaged builder when `--dataset_name` is a local file.
LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _local_file_builder(path: str) -> str | None:
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return LOCAL_FILE_BUILDERS.get(os.path.splitext(name)[1])


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


class DatasetFileError(ValueError):
    """Data that cannot be read as it is: the message names the file (and line) or split (and row), and the fix."""


#: Builders reading text files, whose lines a decoding error can be located in.
TEXT_BUILDERS = ("json", "csv")


def _first_undecodable_line(path: str) -> tuple[int, int, int] | None:
    """(line, byte offset in the line, the byte) of the first invalid UTF-8 in a local file, read as `datasets` reads
    it (decompressed by suffix); None if it decodes, or if its compression cannot be read here."""
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    return number, error.start, raw[error.start]
    except (ImportError, ValueError, OSError):
        return None
    return None


def _encoding_error(error: BaseException) -> bool:
    """Whether a reader's failure (or one it chains to) is text that is not UTF-8."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).lower()
        if isinstance(error, UnicodeDecodeError) or "utf-8" in text or "utf8" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _undecodable_file_error(path: str) -> DatasetFileError | None:
    found = _first_undecodable_line(path)
    if found is None:
        return None
    line, offset, byte = found
    return DatasetFileError(
        f"{path}, line {line}: the text is not valid UTF-8 (byte 0x{byte:02x} at byte {offset + 1} of the line). "
        "Datasets are read as UTF-8: re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > NEW_FILE` for a "
        "Latin-1 file) and pass the new file."
    )


def _located(files) -> DatasetFileError | None:
    """The error naming the first line that is not UTF-8 in the first such file of `files` (local files only)."""
    for path in files:
        error = _undecodable_file_error(path) if os.path.isfile(path) else None
        if error is not None:
            return error
    return None


def check_text_is_utf8(dataset, source: str, files=()) -> None:
    """Refuse a loaded `DatasetDict` whose string values are not valid UTF-8 (Arrow's JSON reader takes such bytes
    as they are; they would fail at the first read of their row). A full Arrow validation per split, no Python per
    row unless it fails. The error names the line in the first of the local `files` holding such text, else
    `source`'s split, column and row."""
    import pyarrow as pa

    for split_name, split in dataset.items():
        table = split.data.table
        try:
            table.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        error = _located(files)
        if error is not None:
            raise error
        for column in table.column_names:
            values = table.column(column)
            try:
                values.validate(full=True)
            except pa.ArrowInvalid:
                row = next(i for i in range(len(values)) if not _decodes(values, i))
                raise DatasetFileError(
                    f"{source}: split {split_name!r}, column {column!r}, row {row} holds text that is not valid UTF-8. "
                    "Datasets are read as UTF-8: re-encode the data as UTF-8."
                ) from None


def _decodes(values, index: int) -> bool:
    try:
        values[index].as_py()
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def load_preference_dataset(name: str, config: str | None = None, streaming: bool = False):
    """Load `name` as a `DatasetDict`: a `save_to_disk` folder, a local data file (its rows form the 'train' split),
    or anything `datasets.load_dataset` takes (a Hub name, a folder of data files). Text that is not UTF-8 raises
    `DatasetFileError` naming the file and line (local JSON / CSV files) or the split, column and row."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = os.path.expanduser(name)
    if os.path.isdir(path) and _is_saved_dataset(path):
        dataset = load_from_disk(path)
        dataset = dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})
    elif os.path.isfile(path):
        builder = _local_file_builder(path)
        if builder is None:
            raise ValueError(
                f"Cannot tell the format of the local dataset file {path!r}: use one of "
                f"{sorted(LOCAL_FILE_BUILDERS)} (optionally compressed), or a `save_to_disk` folder."
            )
        try:
            dataset = load_dataset(builder, data_files=path, streaming=streaming)
        except Exception as error:
            located = _located([path]) if builder in TEXT_BUILDERS and _encoding_error(error) else None
            if located is None:
                raise
            raise located from None
    else:
        dataset = load_dataset(name, name=config, streaming=streaming)
    if not streaming:
        check_text_is_utf8(dataset, f"--dataset_name {name}", [path])
    return dataset


def mixture_files(dataset_args) -> list[str]:
    """The local files a `datasets:` mixture names (entry paths and their data_files), to locate an encoding error."""
    files = []
    for entry in dataset_args.datasets:
        files.append(os.path.expanduser(entry.path))
        data_files = entry.data_files
        if isinstance(data_files, dict):
            data_files = [f for value in data_files.values() for f in ([value] if isinstance(value, str) else value)]
        for name in [data_files] if isinstance(data_files, str) else data_files or []:
            files += [os.path.expanduser(name), os.path.join(os.path.expanduser(entry.path), name)]
    return files


def load_datasets(script_args, dataset_args):
    """The `DatasetDict` named by TRL's `ScriptArguments` (`dataset_name`, `dataset_config`) or by a
    `DatasetMixtureConfig` (`datasets:`, which wins when both are set). Streaming is refused: the scripts precompute
    the reference log-probs of every pair before training, which needs a map-style dataset."""
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are set: loading the `datasets` mixture only.")
        streaming = dataset_args.streaming
        try:
            dataset = get_dataset(dataset_args)
        except Exception as error:
            located = _located(mixture_files(dataset_args)) if _encoding_error(error) else None
            if located is None:
                raise
            raise located from None
        if not streaming:
            check_text_is_utf8(dataset, "the datasets: mixture", mixture_files(dataset_args))
    elif script_args.dataset_name:
        streaming = script_args.dataset_streaming
        dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config, streaming)
    else:
        raise ValueError("Set `dataset_name` (Hub name, local file or save_to_disk folder) or a `datasets` mixture.")
    if streaming:
        raise ValueError(
            "Streaming datasets are not supported: the reference log-probs and margins are precomputed per pair before "
            "training, which needs a map-style dataset. Drop `dataset_streaming` / `streaming`."
        )
    return dataset


def drop_redundant_prompt(dataset):
    """Bring a split into a layout TRL 1.16 accepts, if it has a string `prompt` next to conversational
    `chosen` / `rejected` (as `HuggingFaceH4/ultrafeedback_binarized` does, where both conversations start with the
    user turn). TRL wants all three columns in one format, so the string `prompt` is dropped: TRL then uses the
    shared start of the two conversations as the prompt (its implicit-prompt format). Other layouts are untouched."""
    from datasets import Value

    features = dataset.features or {}
    prompt, chosen = features.get("prompt"), features.get("chosen")
    if isinstance(prompt, Value) and prompt.dtype in ("string", "large_string") and chosen is not None:
        if not isinstance(chosen, Value):  # a list of {"role", "content"} messages
            logger.info("Dropping the string `prompt` column: `chosen`/`rejected` are conversations that contain it.")
            return dataset.remove_columns("prompt")
    return dataset


def split(dataset, name: str, role: str):
    """Split `name` of `dataset`, for `role` ('training' or 'evaluation'), through `drop_redundant_prompt`."""
    if name not in dataset:
        raise ValueError(
            f"The dataset has no {name!r} split for {role} (it has {list(dataset)}). Set "
            f"`--dataset_{'train' if role == 'training' else 'test'}_split`, or use a `datasets` mixture with "
            "`test_split_size` to split one off."
        )
    return drop_redundant_prompt(dataset[name])
