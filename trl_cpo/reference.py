"""Reference-margin precompute: the part of CPO / E-CPOC that reads the frozen reference, once, before training.

Public pieces, reusable outside the trainers:

- `compute_reference_logps(trainer, dataset, batch_size=...)`: one no-grad pass of the reference over a prepared
  (tokenized) dataset on every rank, gathered so that every rank holds the full per-pair result in dataset order. No
  cache file is shared between ranks, so in-memory datasets work under several processes (TRL's own precompute writes
  an `.arrow` cache that other ranks cannot find for in-memory datasets). Pairs are batched longest first, so each
  batch holds pairs of similar length and pays little padding (TRL batches in dataset order).
- `ReferenceLogps`: the result, with completion lengths so either log-prob scale (summed or per-token) can be formed.
- `save_reference_checkpoint` / `load_reference_checkpoint`: the train and eval sets' reference log-probs, stored in
  every checkpoint folder (`trl_cpo_reference.safetensors`), so a resumed run trains and evaluates against the same
  reference (and so the same margins) even if the model it was rebuilt from differs. The file is written atomically
  and checked when read (`ReferenceFileError` names the file, the problem and the fix).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import _trl_compat
from .logps import completion_lengths, to_loss_space

#: File written into each checkpoint folder by the CPO / E-CPOC trainers.
REFERENCE_FILE = "trl_cpo_reference.safetensors"


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


def checkpoint_reference_path(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, REFERENCE_FILE)


#: The per-pair tensors of each split (all float32, one value per pair); `row_digests` (int64) is optional.
_LOGPS_FIELDS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths")
_TEMP_PREFIX = f".{REFERENCE_FILE}."
_TEMP_SUFFIX = ".tmp"


class ReferenceFileError(ValueError):
    """A checkpoint's reference file that cannot be used: unreadable, incomplete, inconsistent or non-finite.

    The message names the file, what is wrong and the fix. Raised by `load_reference_checkpoint` and
    `read_reference_metadata` (and so by a trainer's `train(resume_from_checkpoint=...)`) before any training step.
    """

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(
            f"The reference file {path} is unusable: {problem}. This file holds the reference log-probs (and so the "
            "margins) the checkpoint was trained against; a damaged one must not be trained on. Fix: delete it "
            f"(`rm {path}`) and resume again: the reference is then recomputed from the model given to the trainer "
            "(the same base model gives the same margins; a warning says so), or resume from another checkpoint."
        )


def save_reference_checkpoint(
    checkpoint_dir: str, splits: dict[str, ReferenceLogps], metadata: dict[str, object] | None = None
) -> None:
    """Write the reference log-probs of each named split ("train", eval set names) into `checkpoint_dir`.

    `metadata` (JSON-serialisable) is stored next to them and read back by `read_reference_metadata`. The file is
    written atomically (a temporary file in the same folder, flushed to disk, then renamed over the final name), so a
    process killed at any moment leaves either the previous file or the new one, never a partial file under this name.
    """
    names = list(splits)
    tensors = {}
    for index, reference in enumerate(splits.values()):
        for name in _LOGPS_FIELDS:
            tensors[f"{index}.{name}"] = getattr(reference, name).detach().to("cpu", torch.float32).contiguous()
        if reference.row_digests is not None:
            tensors[f"{index}.row_digests"] = reference.row_digests.detach().to("cpu", torch.int64).contiguous()
    header = {"splits": json.dumps(names), "trl_cpo": json.dumps(metadata or {})}
    path = checkpoint_reference_path(checkpoint_dir)
    temporary = os.path.join(checkpoint_dir, f"{_TEMP_PREFIX}{os.getpid()}{_TEMP_SUFFIX}")
    save_file(tensors, temporary, metadata=header)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_folder(checkpoint_dir)
    # Temporary files of writers killed before their rename (other process ids) are dead weight: remove them.
    for leftover in os.listdir(checkpoint_dir):
        if leftover.startswith(_TEMP_PREFIX) and leftover.endswith(_TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(checkpoint_dir, leftover))


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable across a machine crash (a killed process needs no more than the rename).
    # POSIX only: Windows cannot open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No reference file at {path}.")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types (and OSError, ValueError)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ReferenceFileError(
            path,
            f"it is not a readable safetensors file ({type(error).__name__}: {detail}); it is truncated or corrupted, "
            "e.g. by a copy or a save that did not finish",
        ) from None
    return tensors, header or {}


def _parse_header(path: str, header: dict[str, str]) -> tuple[list[str], dict[str, object]]:
    if "splits" not in header:
        raise ReferenceFileError(
            path,
            "its header has no 'splits' entry (the metadata is missing: the file was not written by "
            "trl_cpo.save_reference_checkpoint, or was rewritten without it)",
        )
    try:
        names = json.loads(header["splits"])
    except json.JSONDecodeError:
        raise ReferenceFileError(
            path, f"its header entry 'splits' is not valid JSON: {header['splits'][:80]!r}"
        ) from None
    if (
        not isinstance(names, list)
        or not all(isinstance(name, str) for name in names)
        or len(set(names)) != len(names)
    ):
        raise ReferenceFileError(
            path, f"its header entry 'splits' must be a list of distinct split names, got {names!r}"
        )
    try:
        metadata = json.loads(header.get("trl_cpo", "{}"))
    except json.JSONDecodeError:
        raise ReferenceFileError(
            path, f"its header entry 'trl_cpo' (the run's settings) is not valid JSON: {header['trl_cpo'][:80]!r}"
        ) from None
    if not isinstance(metadata, dict):
        raise ReferenceFileError(path, f"its header entry 'trl_cpo' must be a JSON object, got {metadata!r}")
    return names, metadata


def _check_split(path: str, name: str, index: int, tensors: dict[str, torch.Tensor]) -> ReferenceLogps:
    values = {}
    for field_name in _LOGPS_FIELDS:
        key = f"{index}.{field_name}"
        if key not in tensors:
            raise ReferenceFileError(path, f"split {name!r} is missing its tensor {key!r}")
        tensor = tensors[key]
        if tensor.dim() != 1:
            raise ReferenceFileError(
                path, f"split {name!r}: {field_name} must be 1-D (one value per pair), got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype != torch.float32:
            raise ReferenceFileError(
                path,
                f"split {name!r}: {field_name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected float32",
            )
        values[field_name] = tensor
    sizes = {field_name: tensor.numel() for field_name, tensor in values.items()}
    if len(set(sizes.values())) != 1:
        raise ReferenceFileError(
            path,
            f"split {name!r}: its tensors hold different numbers of pairs ({', '.join(f'{k}: {v}' for k, v in sizes.items())})",
        )
    for field_name, tensor in values.items():
        bad = (~torch.isfinite(tensor)).nonzero().flatten()
        if bad.numel():
            rows = ", ".join(str(i) for i in bad[:10].tolist()) + (", ..." if bad.numel() > 10 else "")
            raise ReferenceFileError(
                path,
                f"split {name!r}: {field_name} holds {bad.numel()} non-finite value(s) (NaN or inf) at row(s) {rows}",
            )
    for field_name in ("chosen_lengths", "rejected_lengths"):
        lengths = values[field_name]
        if ((lengths < 0) | (lengths != lengths.round())).any():
            raise ReferenceFileError(
                path, f"split {name!r}: {field_name} must hold completion token counts (integers >= 0)"
            )
    digests = tensors.get(f"{index}.row_digests")
    if digests is not None and (digests.dtype != torch.int64 or tuple(digests.shape) != (len(values["chosen"]),)):
        raise ReferenceFileError(
            path,
            f"split {name!r}: row_digests must be int64 with one value per pair ({len(values['chosen'])}), got "
            f"{str(digests.dtype).removeprefix('torch.')} of shape {tuple(digests.shape)}",
        )
    return ReferenceLogps(**values, row_digests=digests)


def read_reference_metadata(checkpoint_dir: str) -> dict[str, object]:
    """The `metadata` dict `save_reference_checkpoint` stored (empty for files written without it).

    Raises `ReferenceFileError` if the file is unreadable or its header is damaged.
    """
    path = checkpoint_reference_path(checkpoint_dir)
    _, header = _read_file(path)
    return _parse_header(path, header)[1]


def load_reference_checkpoint(checkpoint_dir: str) -> dict[str, ReferenceLogps]:
    """Read what `save_reference_checkpoint` wrote: {split name: ReferenceLogps}.

    Everything is checked before it is returned: the header (split names, settings), each split's tensors (present,
    1-D, float32, one value per pair) and their values (finite; lengths are token counts). Any failure raises
    `ReferenceFileError`, which names the file, the problem and the fix.
    """
    path = checkpoint_reference_path(checkpoint_dir)
    tensors, header = _read_file(path)
    names, _ = _parse_header(path, header)
    return {name: _check_split(path, name, index, tensors) for index, name in enumerate(names)}
