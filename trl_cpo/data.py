"""Preference data checks shared by the trainers and the audit, and the fingerprint that binds a checkpoint to its data.

- `validate_preference_dataset(dataset, name)`: the raw-data checks, run before TRL tokenizes anything (the trainers'
  `__init__`, `evaluate(eval_dataset=...)`, the audit). Missing columns, an empty dataset, `None` or non-text values,
  mixed formats, empty completions, conversational completions without an assistant message and a dataset whose
  every pair has the same chosen and rejected response (`trl_cpo.pair_checks`) each raise a `ValueError` naming the
  dataset, the column, the first offending rows and the fix. Every format TRL accepts goes through: explicit or implicit prompt (the implicit one is split off
  as TRL does, then checked), text or conversational (lists of `{'role', 'content'}` messages, tool calls included).
- `LengthReport`: what TRL's `max_length` does to a tokenized dataset (pairs dropped because their prompt fills it,
  pairs truncated), with the `max_length` that would keep them; the trainers log it once per dataset and refuse a
  dataset whose every prompt is too long.
- `pair_digests(dataset)`: one 64-bit digest per tokenized pair (prompt, chosen and rejected token ids), in dataset
  order. Stored with a checkpoint's reference log-probs, they let a resumed run prove it trains on the same pairs in the
  same order; `describe_pair_difference` says what differs when it does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from . import _trl_compat, pair_checks

#: Token-id columns of a dataset prepared by `trl.DPOTrainer` (what the reference actually scored).
TOKEN_COLUMNS = _trl_compat.TOKENIZED_COLUMNS


def pair_digests(dataset, columns: tuple[str, ...] = TOKEN_COLUMNS, batch_size: int = 4096) -> torch.Tensor:
    """One signed 64-bit BLAKE2b digest per row of a tokenized preference dataset, in dataset order.

    Each digest covers the row's prompt, chosen and rejected token ids with their lengths, so two rows share a digest
    only if they tokenize identically (up to a 2**-64 collision chance). Reads the columns through Arrow in batches,
    so it costs a pass over the token ids and no Python list per token.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    digests: list[int] = []
    arrow_rows = dataset.select_columns(list(columns)).with_format("arrow")
    for table in arrow_rows.iter(batch_size=batch_size):
        parts = []
        for name in columns:
            column = table.column(name).combine_chunks()
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
            values = pc.list_flatten(column).cast(pa.int64()).to_numpy(zero_copy_only=False)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            parts.append((lengths, values, offsets))
        for row in range(table.num_rows):
            digest = hashlib.blake2b(digest_size=8)
            for lengths, values, offsets in parts:
                digest.update(lengths[row].tobytes())
                digest.update(values[offsets[row] : offsets[row + 1]].tobytes())
            digests.append(int.from_bytes(digest.digest(), "little", signed=True))
    return torch.tensor(digests, dtype=torch.int64)


def fingerprint(digests: torch.Tensor) -> str:
    """SHA-256 (hex) of per-pair digests in order: one string that changes with any pair or with the order."""
    return hashlib.sha256(digests.to(torch.int64).numpy().tobytes()).hexdigest()


def describe_pair_difference(saved: torch.Tensor, current: torch.Tensor) -> str | None:
    """What tells the pairs behind `saved` digests from those behind `current`, in words; None if they are the same.

    Tells apart another number of pairs, the same pairs in another order, and other pairs (how many, and the first
    row that differs).
    """
    if saved.numel() != current.numel():
        return f"trained on {saved.numel()} pairs; this train_dataset has {current.numel()}"
    if torch.equal(saved, current):
        return None
    different = (saved != current).nonzero().flatten()
    first = different[0].item()
    if torch.equal(saved.sort().values, current.sort().values):
        return f"trained on the same {saved.numel()} pairs in another order (first moved: row {first})"
    return f"trained on other pairs: {different.numel()} of {saved.numel()} pairs differ (first at row {first})"


# -- raw preference data -----------------------------------------------------------------------------------------------

#: Columns a paired preference dataset must have; "prompt" is optional (implicit prompt: the shared beginning).
REQUIRED_COLUMNS = ("chosen", "rejected")
_SHOWN_ROWS = 10


def _rows(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:_SHOWN_ROWS])
    return f"row(s) {shown}{', ...' if len(indices) > _SHOWN_ROWS else ''} ({len(indices)} in all)"


def _kind(value) -> str:
    """'text', 'messages' (a list of dicts with a 'role'), or the type name of anything else."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return "messages"
    if isinstance(value, list) and not value:
        return "empty list"
    return type(value).__name__


def _is_blank(value) -> bool:
    """Whether a completion carries nothing to score: blank text, no messages, or messages with neither content nor
    tool calls (content may be text or a list of parts; a non-text part, e.g. an image, counts as content)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return all(_is_blank(item) for item in value)
    if isinstance(value, dict):
        if value.get("tool_calls"):
            return False
        if "role" in value:
            return _is_blank(value.get("content"))
        if value.get("type", "text") == "text":
            return _is_blank(value.get("text"))
        return False
    return False


def _split_implicit_prompt(chosen, rejected):
    # TRL's own split (`trl.data_utils.extract_prompt`, as DPOTrainer applies it), so the completions checked are the
    # ones it will train on. It needs two non-empty values, which the earlier checks guarantee.
    from trl.data_utils import extract_prompt

    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    return split["chosen"], split["rejected"]


def _batches(dataset, columns: list[str], batch_size: int = 1000) -> Iterable[tuple[int, dict[str, list]]]:
    start = 0
    for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
        yield start, batch
        start += len(batch[columns[0]])


def validate_preference_dataset(dataset, name: str = "train_dataset") -> None:
    """Check a raw (not yet tokenized) paired preference dataset; raise `ValueError` naming the problem and the fix.

    Checks, in this order: rows present; 'chosen' and 'rejected' columns; no `None`; every value text or a list of
    messages, in the format of the first row (TRL decides the format from it) and the same for all columns; no empty
    completion (after splitting off an implicit prompt as TRL does); an assistant message in every conversational
    completion; not every pair with chosen == rejected. `None` datasets and iterable datasets (which
    cannot be scanned without consuming them) are left to TRL. Extra columns are ignored.
    """
    from datasets import Dataset

    if dataset is None or not isinstance(dataset, Dataset):
        return
    columns = dataset.column_names
    if len(dataset) == 0:
        raise ValueError(
            f"{name} has no rows: there is nothing to train on or evaluate. Check the split you loaded and any filter "
            "applied to it (len(dataset) must be > 0)."
        )
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        hint = ""
        if "completion" in columns and "label" in columns:
            hint = (
                " This looks like unpaired preference data (prompt, completion, label: the KTO format); CPO and E-CPOC "
                "need a chosen and a rejected response per prompt."
            )
        raise ValueError(
            f"{name} has no column {' or '.join(repr(c) for c in missing)} (its columns: {columns}). A preference "
            "dataset needs 'chosen' and 'rejected' (and optionally 'prompt'; otherwise the shared beginning of chosen "
            "and rejected is the prompt, as in TRL); rename the columns that hold the preferred and dispreferred "
            f"responses, e.g. dataset.rename_column('response_a', 'chosen').{hint}"
        )
    checked = [column for column in ("prompt", "chosen", "rejected") if column in columns]
    first = dataset.select_columns(checked)[0]
    first_kinds = {column: _kind(first[column]) for column in checked}
    expected = "messages" if "messages" in first_kinds.values() else "text"

    none: dict[str, list[int]] = {column: [] for column in checked}
    wrong: dict[str, list[int]] = {column: [] for column in checked}
    wrong_kind: dict[str, str] = {}
    for start, batch in _batches(dataset, checked):
        for column in checked:
            for offset, value in enumerate(batch[column]):
                if value is None:
                    none[column].append(start + offset)
                    continue
                kind = _kind(value)
                if kind != expected and not (kind == "empty list" and expected == "messages"):
                    wrong[column].append(start + offset)
                    wrong_kind.setdefault(column, kind)
    for column in checked:
        if none[column]:
            raise ValueError(
                f"{name}: column {column!r} holds None at {_rows(none[column])}. Every pair needs a prompt (or an "
                "implicit one), a chosen and a rejected response; drop or fill these rows, e.g. "
                f"dataset.filter(lambda row: row[{column!r}] is not None)."
            )
    if {"text", "messages"} <= set(first_kinds.values()):
        kinds = ", ".join(f"{column!r} is {kind}" for column, kind in first_kinds.items())
        raise ValueError(
            f"{name}: the first row mixes formats ({kinds}). TRL reads every column in the same format: all text "
            "(standard) or all lists of {'role', 'content'} messages (conversational); convert the columns to the "
            "same format."
        )
    for column in checked:
        if wrong[column]:
            hint = ""
            if wrong_kind[column] == "list":
                hint = (
                    " Lists of {'from', 'value'} messages (ShareGPT style) convert with "
                    "trl.data_utils.maybe_convert_to_chatml."
                )
            raise ValueError(
                f"{name}: column {column!r} holds {wrong_kind[column]} values at {_rows(wrong[column])}; every column "
                "must hold text (standard format) or lists of {'role', 'content'} messages (conversational format), "
                f"all in the format of the first row ({'messages' if expected == 'messages' else 'text'}). Fix or drop "
                f"those rows.{hint}"
            )

    implicit = "prompt" not in columns
    empty: dict[str, list[int]] = {"chosen": [], "rejected": []}
    no_assistant: dict[str, list[int]] = {"chosen": [], "rejected": []}
    identical = 0
    for start, batch in _batches(dataset, ["chosen", "rejected"]):
        for offset, (chosen, rejected) in enumerate(zip(batch["chosen"], batch["rejected"])):
            if implicit and not (_is_blank(chosen) or _is_blank(rejected)):
                chosen, rejected = _split_implicit_prompt(chosen, rejected)
            identical += chosen == rejected
            for column, value in (("chosen", chosen), ("rejected", rejected)):
                if _is_blank(value):
                    empty[column].append(start + offset)
                elif expected == "messages" and not pair_checks.has_assistant_message(value):
                    no_assistant[column].append(start + offset)
    for column, rows in empty.items():
        if rows:
            keep = (
                f"dataset.filter(lambda row: row[{column!r}].strip())"
                if expected == "text"
                else f"dataset.filter(lambda row: any(m['content'] for m in row[{column!r}]))"
            )
            raise ValueError(
                f"{name}: column {column!r} has {len(rows)} empty completion(s)"
                + (" (after splitting off the implicit prompt, as TRL does)" if implicit else "")
                + f", at {_rows(rows)}. An empty completion has no log-probability to compare: TRL would train on "
                f"its EOS token alone. Drop these rows, e.g. {keep}."
            )
    for column, rows in no_assistant.items():
        if rows:
            raise pair_checks.no_assistant_error(name, column, rows, implicit)
    if identical == len(dataset):
        raise pair_checks.all_identical_error(name, len(dataset))


# -- lengths after tokenization ----------------------------------------------------------------------------------------


def token_lengths(dataset, column: str) -> np.ndarray:
    """Lengths of a token-id list column, read through Arrow (no Python list per row)."""
    import pyarrow.compute as pc

    table = dataset.select_columns([column]).with_format("arrow")[:]
    return pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)


def pair_lengths(prepared) -> np.ndarray:
    """Prompt + longest completion, in tokens, per pair of a prepared dataset: what `max_length` truncates."""
    completions = np.maximum(token_lengths(prepared, "chosen_ids"), token_lengths(prepared, "rejected_ids"))
    return token_lengths(prepared, "prompt_ids") + completions


@dataclass
class LengthReport:
    """What `max_length` does to a tokenized dataset, as TRL applies it.

    TRL drops pairs whose prompt alone has at least `max_length` tokens (with `truncation_mode='keep_start'`) and
    truncates the others to `max_length` tokens of prompt + completion (completions include the EOS token).
    """

    name: str
    max_length: int
    num_pairs: int
    #: Rows (in the dataset passed in) that were dropped, and their prompt / longest prompt+completion lengths.
    dropped_rows: list[int]
    dropped_prompt_lengths: list[int]
    dropped_pair_lengths: list[int]
    #: prompt + longest completion, per kept pair.
    kept_pair_lengths: list[int]

    @property
    def truncated(self) -> int:
        return sum(length > self.max_length for length in self.kept_pair_lengths)

    @property
    def whole_length(self) -> int:
        """The smallest max_length that keeps every pair whole (nothing dropped, nothing truncated)."""
        return max([*self.kept_pair_lengths, *self.dropped_pair_lengths], default=0)

    def all_dropped_error(self) -> ValueError:
        shortest = min(self.dropped_prompt_lengths)
        return pair_checks.PreferenceDataError(
            f"{self.name}: every one of its {self.num_pairs} pairs has a prompt (column 'prompt') of at least "
            f"max_length={self.max_length} tokens, at {_rows(self.dropped_rows)} (shortest prompt: {shortest} tokens), "
            "so TRL drops them all and nothing is left to score. Raise max_length: "
            f"max_length={shortest + 1} keeps the pairs with the shortest prompt, max_length={self.whole_length} keeps "
            "every pair whole. Or shorten the prompts."
        )

    def message(self) -> str | None:
        """One line for the log, or None when max_length neither drops nor truncates anything."""
        parts = []
        if self.dropped_rows:
            shown = ", ".join(str(i) for i in self.dropped_rows[:_SHOWN_ROWS])
            more = ", ..." if len(self.dropped_rows) > _SHOWN_ROWS else ""
            parts.append(
                f"{len(self.dropped_rows)} of {self.num_pairs} pairs dropped because their prompt alone fills "
                f"max_length={self.max_length} (rows {shown}{more}); max_length={max(self.dropped_prompt_lengths) + 1} "
                "keeps them"
            )
        if self.truncated:
            parts.append(
                f"{self.truncated} of the {len(self.kept_pair_lengths)} kept pairs truncated to "
                f"max_length={self.max_length} (prompt + longest completion up to {max(self.kept_pair_lengths)} tokens)"
            )
        if not parts:
            return None
        return (
            f"{self.name}: " + "; ".join(parts) + f". max_length={self.whole_length} keeps every pair whole. The "
            "reference margins and the training loss see only what is left."
        )


#: Temporary column that tells which rows TRL's length filter kept (removed before the dataset is used).
_ROW_COLUMN = "__trl_cpo_row__"


def prepare_with_length_report(prepare, dataset, processing_class, args, dataset_name: str):
    """(prepared dataset, `LengthReport`): TRL's preparation (`prepare`, DPOTrainer._prepare_dataset) of `dataset`
    unchanged, plus the count of the pairs `max_length` drops and truncates. Raises the report's error when no pair
    is left. `dataset` is a non-empty map-style Dataset and `args.max_length` is set."""
    import copy

    indexed = dataset.add_column(_ROW_COLUMN, list(range(len(dataset))))
    prepared = prepare(indexed, processing_class, args, dataset_name)
    kept = prepared[_ROW_COLUMN]
    prepared = prepared.remove_columns(_ROW_COLUMN)
    dropped = sorted(set(range(len(dataset))) - set(kept))
    dropped_prompt_lengths, dropped_pair_lengths = [], []
    if dropped:
        # The dropped pairs' lengths, to say which max_length keeps them: the same preparation without the filter, on
        # those pairs only.
        unfiltered = copy.copy(args)
        unfiltered.max_length = None
        lost = prepare(dataset.select(dropped), processing_class, unfiltered, dataset_name)
        dropped_prompt_lengths = token_lengths(lost, "prompt_ids").tolist()
        dropped_pair_lengths = pair_lengths(lost).tolist()
    label = {"train": "train_dataset", "eval": "eval_dataset"}.get(dataset_name, f"eval_dataset[{dataset_name!r}]")
    report = LengthReport(
        name=label,
        max_length=args.max_length,
        num_pairs=len(dataset),
        dropped_rows=dropped,
        dropped_prompt_lengths=dropped_prompt_lengths,
        dropped_pair_lengths=dropped_pair_lengths,
        kept_pair_lengths=pair_lengths(prepared).tolist() if len(prepared) else [],
    )
    if len(prepared) == 0:
        raise report.all_dropped_error()
    return prepared, report


def validate_datasets(train_dataset, eval_dataset) -> None:
    """`validate_preference_dataset` on a trainer's train set and each eval set, before TRL tokenizes anything."""
    from datasets import Dataset

    validate_preference_dataset(train_dataset, "train_dataset")
    if isinstance(eval_dataset, dict):
        for key, dataset in eval_dataset.items():
            validate_preference_dataset(dataset, f"eval_dataset[{key!r}]")
    elif isinstance(eval_dataset, Dataset) and not (
        # Datasets this trainer prepared already passed (e.g. `evaluate(trainer.eval_dataset)`).
        hasattr(eval_dataset, "column_names") and "prompt_ids" in eval_dataset.column_names
    ):
        validate_preference_dataset(eval_dataset, "eval_dataset")
