"""Preference data checks shared by the trainers and the audit, and the fingerprint that binds a checkpoint to its data.

- `pair_digests(dataset)`: one 64-bit digest per tokenized pair (prompt, chosen and rejected token ids), in dataset
  order. Stored with a checkpoint's reference log-probs, they let a resumed run prove it trains on the same pairs in the
  same order; `describe_pair_difference` says what differs when it does not.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

#: Token-id columns of a dataset prepared by `trl.DPOTrainer` (what the reference actually scored).
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


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
