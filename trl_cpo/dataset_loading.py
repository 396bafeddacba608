"""Loading the preference data a TRL-style script names: `trl-cpo train` and `trl-cpo audit` read it through here.

The arguments are TRL's own (`trl.ScriptArguments` and `trl.DatasetMixtureConfig`): a `datasets:` mixture is read with
`trl.get_dataset`; `--dataset_name` takes a Hub dataset, a local JSON / JSON-lines / Parquet / CSV / Arrow file (its
rows form the 'train' split; `.gz`, `.bz2`, `.xz`, `.zst`, `.lz4` compression allowed), or a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`. `split` then takes one split and brings it into a layout TRL 1.16
accepts (`drop_redundant_prompt`).
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


def load_preference_dataset(name: str, config: str | None = None, streaming: bool = False):
    """Load `name` as a `DatasetDict`: a `save_to_disk` folder, a local data file (its rows form the 'train' split),
    or anything `datasets.load_dataset` takes (a Hub name, a folder of data files)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = os.path.expanduser(name)
    if os.path.isdir(path) and _is_saved_dataset(path):
        dataset = load_from_disk(path)
        return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})
    if os.path.isfile(path):
        builder = _local_file_builder(path)
        if builder is None:
            raise ValueError(
                f"Cannot tell the format of the local dataset file {path!r}: use one of "
                f"{sorted(LOCAL_FILE_BUILDERS)} (optionally compressed), or a `save_to_disk` folder."
            )
        return load_dataset(builder, data_files=path, streaming=streaming)
    return load_dataset(name, name=config, streaming=streaming)


def load_datasets(script_args, dataset_args):
    """The `DatasetDict` named by TRL's `ScriptArguments` (`dataset_name`, `dataset_config`) or by a
    `DatasetMixtureConfig` (`datasets:`, which wins when both are set). Streaming is refused: the scripts precompute
    the reference log-probs of every pair before training, which needs a map-style dataset."""
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are set: loading the `datasets` mixture only.")
        streaming = dataset_args.streaming
        dataset = get_dataset(dataset_args)
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
