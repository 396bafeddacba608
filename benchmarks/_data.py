"""Preference pairs for the benchmarks: one loader, which keeps only the pairs the trainers would accept.

`load_pairs(path, limit)` reads the first `limit` records of a JSON-lines file (`.gz` ok). A record with a "prompt" is
taken as is; an HH-RLHF record (two full conversations, no "prompt") becomes an explicit-prompt pair: the shared
dialogue up to the last "Assistant:" is the prompt, the two final answers are the completions. Every pair is then put
through the trainers' own raw-data check (`trl_cpo.data.validate_preference_dataset`, which `CPOTrainer`,
`ECPOCTrainer` and `trl-cpo audit` run before anything is tokenized), and the pairs it refuses are skipped, each with
the validator's reason. Nothing here restates the validator's rules: it is called on halves of the data, down to the
single pairs it refuses.

The shipped file (`benchmarks/data/`, the first 512 pairs of Anthropic's HH-RLHF harmless-base test split, MIT licence
in `LICENSE-hh-rlhf`) has one such pair: record 86, whose chosen answer is empty.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "hh-rlhf-harmless-base-test-512.jsonl.gz"
ASSISTANT = "\n\nAssistant:"
#: Reason given for an HH-RLHF record whose two conversations differ before their final answers.
NOT_A_PAIR = "not an HH-RLHF pair: the two conversations differ before the last 'Assistant:'"
_VALIDATED_AS = "pairs"  # the dataset name the validator is given (and that its messages start with)


@dataclass
class LoadedPairs:
    """The pairs kept, how many records were read, and (record index, reason) for each record skipped."""

    pairs: list[dict[str, str]]
    read: int
    refused: list[tuple[int, str]] = field(default_factory=list)  # by the trainers' validator
    not_pairs: list[int] = field(default_factory=list)  # HH-RLHF records that split into no prompt + two answers

    def summary(self) -> str:
        """What was skipped and why, in one line per cause (record indices count from 0, blank lines aside)."""
        if not self.refused:
            lines = [f"all {self.read} pairs pass the trainers' validator (trl_cpo.data.validate_preference_dataset)"]
        else:
            why = "; ".join(f"row {row}: {reason}" for row, reason in self.refused)
            lines = [f"skipped {len(self.refused)} of {self.read} pairs the trainers' validator refuses: {why}"]
        if self.not_pairs:
            shown = ", ".join(str(row) for row in self.not_pairs[:10]) + (", ..." if len(self.not_pairs) > 10 else "")
            lines.append(f"skipped {len(self.not_pairs)} of {self.read} records: {NOT_A_PAIR} (rows {shown})")
        return "\n".join(lines)


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` JSON records of a JSON-lines file (blank lines skipped; `.gz` read as gzip)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(records) == limit:
                break
            if line.strip():
                records.append(json.loads(line))
    return records


def as_pair(record: dict) -> dict[str, str] | None:
    """An explicit-prompt pair from a record: its own prompt, or an HH-RLHF record split before the final answers
    (None when the two conversations differ before them). Extra fields are dropped."""
    if "prompt" in record:
        return {key: record[key] for key in ("prompt", "chosen", "rejected")}
    chosen, rejected = record["chosen"], record["rejected"]
    cut = chosen.rfind(ASSISTANT) + len(ASSISTANT)
    prompt = chosen[:cut]
    if cut < len(ASSISTANT) or not rejected.startswith(prompt):
        return None
    return {"prompt": prompt, "chosen": chosen[cut:], "rejected": rejected[cut:]}


def refused_pairs(pairs: list[dict]) -> dict[int, str]:
    """{index: the validator's reason} for each pair `validate_preference_dataset` refuses on its own.

    The validator stops at its first finding, so it is asked about halves of the data, and about the halves of a half
    it refuses, down to single pairs: a few calls when few pairs are refused.
    """
    refused: dict[int, str] = {}
    pending = [(0, len(pairs))] if pairs else []
    while pending:
        start, stop = pending.pop()
        error = _validation_error(pairs[start:stop])
        if error is None:
            continue
        if stop - start == 1:
            refused[start] = _short(error)
        else:
            middle = (start + stop) // 2
            pending += [(middle, stop), (start, middle)]
    return dict(sorted(refused.items()))


def load_pairs(path: str | Path = DEFAULT_DATA, limit: int | None = None) -> LoadedPairs:
    """The pairs of the first `limit` records of `path` that the trainers accept (see the module docstring).

    Raises `ValueError` if the kept pairs, each accepted alone, are still refused together (a problem of the whole
    set, such as mixed formats, which skipping pairs cannot fix).
    """
    records = read_records(path, limit)
    candidates, not_pairs = [], []
    for index, record in enumerate(records):
        pair = as_pair(record)
        if pair is None:
            not_pairs.append(index)
        else:
            candidates.append((index, pair))
    refused = refused_pairs([pair for _, pair in candidates])
    kept = [pair for position, (_, pair) in enumerate(candidates) if position not in refused]
    error = _validation_error(kept) if kept else None
    if error is not None:
        raise ValueError(f"{path}: the pairs are refused as a whole, not pair by pair: {error}")
    return LoadedPairs(
        pairs=kept,
        read=len(records),
        refused=[(candidates[position][0], reason) for position, reason in refused.items()],
        not_pairs=not_pairs,
    )


def _validation_error(pairs: list[dict]) -> str | None:
    """The validator's message if it refuses `pairs`, else None."""
    from datasets import Dataset

    import trl_cpo.data

    dataset = Dataset.from_list(pairs)  # outside the `try`: only the validator's refusals are skips
    try:
        trl_cpo.data.validate_preference_dataset(dataset, name=_VALIDATED_AS)
    except ValueError as error:
        return str(error)
    return None


def _short(message: str) -> str:
    """The validator's finding about one pair, without its dataset name, its row list (row 0) or its advice."""
    message = message.removeprefix(f"{_VALIDATED_AS}: ")
    first_sentence = message.split(". ", 1)[0]
    return re.sub(r",? at row\(s\) 0 \(1 in all\)", "", first_sentence).rstrip(".")


# -- a random Llama and the shipped pairs (flags: _smoke.model_and_pairs_parser) ----------------------------------------


def save_model_and_pairs(args, folder: str) -> LoadedPairs:
    """Load the pairs `args` name (printing what was skipped), then save a random Llama of `args`' shape and its
    word-level tokenizer, fitted to those pairs, to `folder`; the pairs loaded."""
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    loaded = load_pairs(args.data, args.num_pairs)
    print(loaded.summary(), flush=True)
    texts = [text for pair in loaded.pairs for text in pair.values()]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=args.vocab_size)
    build_tiny_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return loaded
