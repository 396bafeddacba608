"""Reference-margin precompute: the part of CPO / E-CPOC that reads the frozen reference, once, before training.

Public pieces, reusable outside the trainers:

- `compute_reference_logps(trainer, dataset, batch_size=...)`: one no-grad pass of the reference over a prepared
  (tokenized) dataset on every rank, gathered so that every rank holds the full per-pair result in dataset order. No
  cache file is shared between ranks, so in-memory datasets work under several processes (TRL's own precompute writes
  an `.arrow` cache that other ranks cannot find for in-memory datasets). Pairs are batched longest first, so each
  batch holds pairs of similar length and pays little padding (TRL batches in dataset order).
- `ReferenceLogps`: the result, with completion lengths so either log-prob scale (summed or per-token) can be formed.

Where the results are stored (checkpoints, the audit's file, the cache): `trl_cpo.reference_store`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import _trl_compat
from .logps import completion_lengths, to_loss_space


@dataclass
class ReferenceLogps:
    """Per-pair reference log-probs (summed over completion tokens, as TRL stores them) and completion lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    #: One int64 digest per pair of its token ids (`trl_cpo.data.pair_digests`), when known: what binds a checkpoint's
    #: reference to the pairs it was computed on.
    row_digests: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.chosen.numel()

    def in_loss_space(self, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs summed, or averaged per completion token if `length_normalized`."""
        return to_loss_space(self.chosen, self.rejected, self.chosen_lengths, self.rejected_lengths, length_normalized)

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs averaged per completion token, whatever the loss's space."""
        return self.in_loss_space(True)

    def delta_ref(self, length_normalized: bool) -> torch.Tensor:
        """Reference log-odds `logp_ref(y_w) - logp_ref(y_l)` in the loss's space."""
        chosen, rejected = self.in_loss_space(length_normalized)
        return chosen - rejected

    def same_pairs(self, other: ReferenceLogps) -> bool:
        """Whether `other` was computed on the same pairs: the same token ids row by row where both carry digests,
        else (files written before digests) the same count and the same completion lengths, row by row."""
        if self.row_digests is not None and other.row_digests is not None:
            return torch.equal(self.row_digests, other.row_digests)
        return (
            len(self) == len(other)
            and torch.equal(self.chosen_lengths, other.chosen_lengths)
            and torch.equal(self.rejected_lengths, other.rejected_lengths)
        )


def _reference_model(trainer):
    # The reference is a separate model when there is one; otherwise the policy itself (full fine-tuning, before any
    # step) or the policy with its adapter disabled (PEFT, handled inside `compute_ref_log_probs`). Under DeepSpeed the
    # not-yet-prepared policy needs an inference engine to place (ZeRO-1/2) or gather (ZeRO-3) its parameters; reuse
    # the one DPOTrainer keeps for this purpose.
    if trainer.ref_model is None and trainer.is_deepspeed_enabled:
        return _trl_compat.deepspeed_precompute_engine(trainer)
    return trainer.ref_model or trainer.model


def _longest_first(dataset: Dataset) -> list[int] | None:
    """Dataset indices ordered by padded pair length (`trl_cpo.data.pair_lengths`), longest first.

    The collator pads a batch to its longest sequence, so batching pairs of similar length saves the padding; longest
    first puts the memory peak on the first batch, where an out-of-memory error costs nothing. None when the dataset
    is not tokenized into `prompt_ids` / `chosen_ids` / `rejected_ids` (the caller then keeps dataset order).
    """
    import numpy as np

    from .data import pair_lengths

    if len(dataset) == 0 or not set(_trl_compat.TOKENIZED_COLUMNS) <= set(dataset.column_names):
        return None
    # Stable sort of the negated lengths: longest first, ties kept in dataset order.
    return np.argsort(-pair_lengths(dataset), kind="stable").tolist()


def compute_reference_logps(
    trainer, dataset: Dataset, *, batch_size: int, desc: str | None = None, sort_by_length: bool = True
) -> ReferenceLogps:
    """Run the frozen reference over a tokenized preference dataset and gather the per-pair results on every rank.

    `trainer` is a `trl.DPOTrainer` (or subclass): its collator, accelerator and `compute_ref_log_probs` are used as
    is, so PEFT adapters, quantized models and the reference-model choice behave exactly as in DPO.

    With `sort_by_length` (the default) the pairs are batched longest first (`_longest_first`) and the gathered rows,
    which come back in that order on every rank, are put back in dataset order; the result is the same as in dataset
    order up to float round-off from the different padding.
    """
    order = _longest_first(dataset) if sort_by_length else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        # A plain index list as sampler: accelerate shards its batches across ranks like a SequentialSampler's, and
        # gather_for_metrics returns them in this order.
        sampler=order,
        collate_fn=trainer.data_collator,
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory,
        shuffle=False,
    )
    loader = trainer.accelerator.prepare(loader)
    model = _reference_model(trainer)
    parts: list[tuple[torch.Tensor, ...]] = []
    show_progress = trainer.accelerator.is_local_main_process and not os.environ.get("TQDM_DISABLE")
    for batch in tqdm(loader, desc=desc, disable=not show_progress):
        chosen, rejected = _trl_compat.reference_logps(trainer, model, batch)
        chosen_lengths, rejected_lengths = completion_lengths(batch[_trl_compat.COMPLETION_MASK])
        # gather_for_metrics drops the samples that even_batches duplicated to fill the last step, so the
        # concatenation has exactly one row per dataset example, in the loader's order (`order`, or dataset order).
        gathered = trainer.accelerator.gather_for_metrics(
            (chosen.float(), rejected.float(), chosen_lengths.to(chosen.device), rejected_lengths.to(chosen.device))
        )
        parts.append(tuple(t.detach().cpu() for t in gathered))
    columns = [torch.cat(column) for column in zip(*parts, strict=True)]
    if order is not None and len(columns[0]) == len(order):
        # Row i of the gathered columns is pair order[i]: scatter back to dataset order.
        index = torch.tensor(order)
        columns = [torch.empty_like(column).index_copy_(0, index, column) for column in columns]
    result = ReferenceLogps(*columns)
    if len(result) != len(dataset):
        raise RuntimeError(f"Reference precompute produced {len(result)} rows for a dataset of {len(dataset)}.")
    if not all(torch.isfinite(t).all() for t in columns):
        raise ValueError(
            "The reference produced non-finite log-probs (NaN or inf) on some pairs; check the reference model's "
            "weights and dtype (fp16 overflows easily; use bf16 or fp32)."
        )
    return result


def with_columns(dataset: Dataset, columns: dict[str, torch.Tensor]) -> Dataset:
    """Return `dataset` with `columns` added as float32 columns, replacing same-named ones."""
    stale = [name for name in columns if name in dataset.column_names]
    if stale:
        dataset = dataset.remove_columns(stale)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values.float().tolist())
    return dataset
