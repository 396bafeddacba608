"""Pairs that cannot teach: checks `trl_cpo.data.validate_preference_dataset` calls on raw pairs, and the check of the
pairs as TRL tokenized them (`check_identical_pairs`, run by the trainers right after TRL's `_prepare_dataset`).

- A conversational completion must hold an assistant message: the completion is what the policy learns to write, and
  the chat template renders it as the messages' own roles (`no_assistant_error`).
- A pair whose chosen and rejected responses are the same has no preference to learn: its log-ratio is 0 whatever the
  weights, so its loss has no gradient. The raw validator refuses a dataset in which every pair has the same chosen
  and rejected value (`all_identical_error`, before any model loads); `check_identical_pairs` compares what the model
  sees (the token ids, truncated to `max_length` as TRL's collator truncates them), refuses a dataset in which every
  pair is identical, and counts the others in one warning.

Errors are `PreferenceDataError`, a `ValueError` the audit reports as one line.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

_SHOWN_ROWS = 10


class PreferenceDataError(ValueError):
    """Preference data that cannot train: the message names the dataset, the rows and the fix."""


def format_rows(indices) -> str:
    indices = list(indices)
    shown = ", ".join(str(i) for i in indices[:_SHOWN_ROWS])
    return f"row(s) {shown}{', ...' if len(indices) > _SHOWN_ROWS else ''} ({len(indices)} in all)"


# -- raw pairs ---------------------------------------------------------------------------------------------------------


def has_assistant_message(messages) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def no_assistant_error(name: str, column: str, rows: list[int], implicit: bool) -> PreferenceDataError:
    where = " (after splitting off the implicit prompt, as TRL does)" if implicit else ""
    return PreferenceDataError(
        f"{name}: column {column!r} has {len(rows)} conversational completion(s) without an assistant message{where}, "
        f"at {format_rows(rows)}. The completion is the response the model learns to write: it must hold the "
        "assistant's reply ({'role': 'assistant', 'content': ...}); user and system turns belong in 'prompt'. Fix "
        f"or drop these rows, e.g. dataset.filter(lambda row: any(m['role'] == 'assistant' for m in row[{column!r}]))."
    )


def all_identical_error(name: str, num_pairs: int) -> PreferenceDataError:
    return PreferenceDataError(
        f"{name}: in all of its {num_pairs} pairs the chosen and rejected responses are the same, so there is no "
        "preference to learn (the log-ratio of two identical responses is 0 whatever the weights: the loss has no "
        "gradient). Check that 'chosen' and 'rejected' come from different columns of your data."
    )


# -- tokenized pairs ---------------------------------------------------------------------------------------------------


def _token_column(dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a token-id list column, read through Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = dataset.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(array).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return values, np.concatenate([[0], np.cumsum(lengths)])


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the first token where `a` and `b` differ (the shorter length if one starts the other)."""
    common = min(len(a), len(b))
    differ = np.flatnonzero(a[:common] != b[:common])
    return int(differ[0]) if len(differ) else common


def identical_pairs(prepared, max_length: int | None = None, truncation_mode: str = "keep_start"):
    """Rows of a dataset prepared by `DPOTrainer._prepare_dataset` whose chosen and rejected sequences are the same
    once TRL's collator truncated prompt + completion to `max_length` tokens (the first ones with 'keep_start', the
    last ones with 'keep_end').

    Returns (all identical rows, the rows among them that differ before truncation, the smallest `max_length` that
    keeps every such pair's difference or None).
    """
    _, prompt_offsets = _token_column(prepared, "prompt_ids")  # only the prompt lengths are needed
    chosen_values, chosen_offsets = _token_column(prepared, "chosen_ids")
    rejected_values, rejected_offsets = _token_column(prepared, "rejected_ids")
    identical, only_truncated, needed = [], [], None
    for row in range(len(prepared)):
        chosen = chosen_values[chosen_offsets[row] : chosen_offsets[row + 1]]
        rejected = rejected_values[rejected_offsets[row] : rejected_offsets[row + 1]]
        if len(chosen) == len(rejected) and np.array_equal(chosen, rejected):
            identical.append(row)
            continue
        if max_length is None:
            continue
        prompt_length = int(prompt_offsets[row + 1] - prompt_offsets[row])
        if truncation_mode == "keep_end":
            same = min(len(chosen), len(rejected)) >= max_length and np.array_equal(
                chosen[-max_length:], rejected[-max_length:]
            )
            keeps = _first_difference(chosen[::-1], rejected[::-1]) + 1
        else:
            visible = max(max_length - prompt_length, 0)
            same = np.array_equal(chosen[:visible], rejected[:visible])
            keeps = prompt_length + _first_difference(chosen, rejected) + 1
        if same:
            identical.append(row)
            only_truncated.append(row)
            needed = keeps if needed is None else max(needed, keeps)
    return identical, only_truncated, needed


def check_identical_pairs(prepared, args, dataset_name: str, dropped_rows=()):
    """Refuse a prepared dataset whose every pair has identical chosen and rejected sequences (`identical_pairs`);
    log one warning counting them when only some are (on processes that log). Returns `prepared` unchanged.

    `dropped_rows`: the input rows TRL's length filter dropped (`LengthReport.dropped_rows`), so that the rows named
    are those of the dataset the user passed.
    """
    from datasets import Dataset

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    if not isinstance(prepared, Dataset) or len(prepared) == 0 or not set(columns) <= set(prepared.column_names):
        return prepared
    identical, only_truncated, needed = identical_pairs(prepared, args.max_length, args.truncation_mode)
    if not identical:
        return prepared
    dropped = set(dropped_rows)
    kept = [row for row in range(len(prepared) + len(dropped)) if row not in dropped]
    label = {"train": "train_dataset", "eval": "eval_dataset"}.get(dataset_name, f"eval_dataset[{dataset_name!r}]")
    truncated = ""
    if only_truncated:
        truncated = (
            f" ({len(only_truncated)} of them only once truncated to max_length={args.max_length} with "
            f"truncation_mode={args.truncation_mode!r}; max_length={needed} keeps their difference)"
        )
    what = (
        f"chosen and rejected are the same sequence of token ids{truncated}, so the model cannot tell them apart: the "
        "log-ratio of two identical sequences is 0 whatever the weights, and such a pair's loss has no gradient"
    )
    if len(identical) == len(prepared):
        raise PreferenceDataError(
            f"{label}: in all of its {len(prepared)} pairs {what}. There is nothing to learn. Check that 'chosen' and "
            "'rejected' hold different responses, that the tokenizer keeps what tells them apart (e.g. it may "
            "lowercase text or map unknown words to one token)"
            + (", and raise max_length" if only_truncated else "")
            + "."
        )
    if args.should_log:
        logger.warning(
            "%s: %d of %d pairs cannot teach: their %s. At %s. Drop them to stop diluting each batch.",
            label,
            len(identical),
            len(prepared),
            what,
            format_rows([kept[row] for row in identical]),
        )
    return prepared
