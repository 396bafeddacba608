"""The reference store: one file format, one save/load pair, for checkpoints, the audit's output and a cache.

A reference file is a safetensors file holding, for each named split ("train", eval set names), the four per-pair
tensors of `trl_cpo.reference.ReferenceLogps` (float32) and its int64 pair digests, plus JSON metadata in the header
(the run's settings, the fingerprint of what the log-probs were computed from). It is written atomically and fully
validated when read (`ReferenceFileError` names the file, the problem and the fix). Three places use it:

- checkpoints: `<checkpoint>/trl_cpo_reference.safetensors`, the train and eval sets' reference, so a resumed run
  trains against the same margins (`save_reference_checkpoint` / `load_reference_checkpoint`);
- the audit's `reference_logps.safetensors` (one "train" split with its fingerprint), which training reads when
  `reference_logps_file` names it (`save_reference_logps` / `load_matching_reference_logps`);
- the cache: one entry per fingerprint key (`trl_cpo.fingerprint.ReferenceFingerprint.key`: reference weights, token
  ids, truncation, precision; nothing a sweep changes) under `reference_cache_dir`, default the folder
  `trl_cpo/reference` beside the Hugging Face datasets cache (or `$TRL_CPO_REFERENCE_CACHE`). The trainers' precompute
  looks an entry up before computing and writes it after computing, from the main process (`ReferenceStore`); the
  audit writes into the same store, so training after an audit finds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fingerprint import ReferenceFingerprint, mismatches
from .reference import ReferenceLogps

logger = logging.getLogger(__name__)

#: File written into each checkpoint folder by the CPO / E-CPOC trainers.
REFERENCE_FILE = "trl_cpo_reference.safetensors"
#: File name `trl-cpo audit` writes into its output folder unless `reference_logps_file` names another path.
DEFAULT_FILE_NAME = "reference_logps.safetensors"
#: `format` of the header.
FORMAT = "trl_cpo.reference/2"
#: The audit file layout of trl-cpo 0.1 (tensors keyed by field name): refused with the fix.
_OLD_AUDIT_FORMAT = "trl_cpo.reference_logps"
#: Environment variable naming the default cache folder.
CACHE_ENV = "TRL_CPO_REFERENCE_CACHE"

#: The per-pair tensors of each split (all float32, one value per pair); `row_digests` (int64) is optional.
_LOGPS_FIELDS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths")
_TEMP_SUFFIX = ".tmp"
#: A temporary file this old, or whose writer is gone, was left by a killed writer.
_STALE_SECONDS = 3600
_RECOMPUTE = "recompute it with `trl-cpo audit --config <the training config>`, or unset reference_logps_file"


class ReferenceFileError(ValueError):
    """A reference file that cannot be used: unreadable, incomplete, inconsistent or non-finite.

    The message names the file, what is wrong and the fix. Raised by `load_reference_file` (and so by a trainer's
    `train(resume_from_checkpoint=...)`, by `reference_logps_file`, and by a damaged store entry) before any step.
    """

    def __init__(self, path: str, problem: str, fix: str | None = None):
        self.path, self.problem = path, problem
        if fix is None:  # a checkpoint's file
            fix = (
                f"delete it (`rm {path}`) and resume again: the reference is then recomputed from the model given to "
                "the trainer (the same base model gives the same margins; a warning says so), or resume from another "
                "checkpoint"
            )
        super().__init__(
            f"The reference file {path} is unusable: {problem}. It holds reference log-probs (and so margins) to "
            f"train against; a damaged one must not be trained on. Fix: {fix}."
        )


def save_reference_file(
    path: str, splits: dict[str, ReferenceLogps], metadata: dict[str, object] | None = None
) -> None:
    """Write the reference log-probs of each named split ("train", eval set names) to `path`.

    `metadata` (JSON-serialisable) is stored next to them and read back by `load_reference_file`. The file is written
    atomically (a temporary file in the same folder, flushed to disk, then renamed over the final name), so a process
    killed at any moment leaves either the previous file or the new one, never a partial file under this name; two
    processes writing the same entry leave one whole file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    names = list(splits)
    tensors = {}
    for index, reference in enumerate(splits.values()):
        for name in _LOGPS_FIELDS:
            tensors[f"{index}.{name}"] = getattr(reference, name).detach().to("cpu", torch.float32).contiguous()
        if reference.row_digests is not None:
            tensors[f"{index}.row_digests"] = reference.row_digests.detach().to("cpu", torch.int64).contiguous()
    header = {"format": FORMAT, "splits": json.dumps(names), "trl_cpo": json.dumps(metadata or {}, default=str)}
    prefix = f".{os.path.basename(path)}."
    temporary = os.path.join(folder, f"{prefix}{os.getpid()}.{threading.get_ident()}{_TEMP_SUFFIX}")
    save_file(tensors, temporary, metadata=header)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_folder(folder)
    # Temporary files of writers killed before their rename are dead weight: remove them. A writer still running
    # (another process sharing a store entry) loses nothing: its rename then fails and it writes again.
    for leftover in os.listdir(folder):
        if leftover.startswith(prefix) and leftover.endswith(_TEMP_SUFFIX) and leftover != os.path.basename(temporary):
            with contextlib.suppress(OSError):
                if _stale(os.path.join(folder, leftover)):
                    os.remove(os.path.join(folder, leftover))


def _stale(temporary: str) -> bool:
    pid = temporary.removesuffix(_TEMP_SUFFIX).split(".")[-2]
    if pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
    return time.time() - os.path.getmtime(temporary) > _STALE_SECONDS


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
    if header.get("format") == _OLD_AUDIT_FORMAT:
        raise ReferenceFileError(
            path, "it is an audit file in the layout of trl-cpo 0.1 (tensors keyed by field name)", _RECOMPUTE
        )
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


def load_reference_file(path: str) -> tuple[dict[str, ReferenceLogps], dict[str, object]]:
    """Read what `save_reference_file` wrote: ({split name: ReferenceLogps}, metadata).

    Everything is checked before it is returned: the header (split names, settings), each split's tensors (present,
    1-D, float32, one value per pair; digests int64) and their values (finite; lengths are token counts). Any failure
    raises `ReferenceFileError`, which names the file, the problem and the fix.
    """
    tensors, header = _read_file(path)
    names, metadata = _parse_header(path, header)
    return {name: _check_split(path, name, index, tensors) for index, name in enumerate(names)}, metadata


# -- checkpoints ----------------------------------------------------------------------------------------------------


def checkpoint_reference_path(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, REFERENCE_FILE)


def save_reference_checkpoint(checkpoint_dir: str, splits: dict[str, ReferenceLogps], metadata=None) -> None:
    """`save_reference_file` into a checkpoint folder."""
    save_reference_file(checkpoint_reference_path(checkpoint_dir), splits, metadata)


def load_reference_checkpoint(checkpoint_dir: str) -> dict[str, ReferenceLogps]:
    """The splits of a checkpoint's reference file (`load_reference_file`)."""
    return load_reference_file(checkpoint_reference_path(checkpoint_dir))[0]


def read_reference_metadata(checkpoint_dir: str) -> dict[str, object]:
    """The metadata of a checkpoint's reference file (`load_reference_file`)."""
    return load_reference_file(checkpoint_reference_path(checkpoint_dir))[1]


# -- the audit's file -------------------------------------------------------------------------------------------------


def save_reference_logps(path: str, reference: ReferenceLogps, fingerprint: ReferenceFingerprint, info=None) -> None:
    """Write a train set's reference log-probs with their fingerprint (the audit's file, and a cache entry)."""
    save_reference_file(path, {"train": reference}, {"fingerprint": fingerprint.to_dict(), "info": info or {}})


def read_reference_logps(path: str) -> tuple[ReferenceLogps, ReferenceFingerprint, dict]:
    """(train reference log-probs, fingerprint, info) of a file `save_reference_logps` wrote."""
    splits, metadata = load_reference_file(path)
    if "train" not in splits or not isinstance(metadata.get("fingerprint"), dict):
        raise ReferenceFileError(
            path, "it holds no fingerprinted 'train' split (it is a checkpoint's file?)", _RECOMPUTE
        )
    return splits["train"], ReferenceFingerprint.from_dict(metadata["fingerprint"]), metadata.get("info", {})


def load_matching_reference_logps(path: str, expected: ReferenceFingerprint) -> ReferenceLogps:
    """The reference log-probs in `path` if their fingerprint matches `expected`; `ValueError` naming what differs."""
    reference, saved, _ = read_reference_logps(path)
    differ = mismatches(saved, expected)
    if differ:
        raise ValueError(
            f"reference_logps_file={path!r} was computed on other inputs than this run's train set: "
            f"{'; '.join(differ)} differ. Recompute it with `trl-cpo audit --config <this training config>` "
            "(it writes the file), or unset reference_logps_file to run the reference here."
        )
    if len(reference) != expected.num_pairs:
        raise ReferenceFileError(
            path, f"it holds {len(reference)} pairs, its fingerprint {saved.num_pairs}", _RECOMPUTE
        )
    return reference


# -- the cache ----------------------------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """`$TRL_CPO_REFERENCE_CACHE`, else `trl_cpo/reference` beside the Hugging Face datasets cache."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    from datasets import config

    return os.path.join(os.path.dirname(os.path.abspath(config.HF_DATASETS_CACHE)), "trl_cpo", "reference")


class ReferenceStore:
    """Cache entries of train and eval sets' reference log-probs, one file per fingerprint key, in `folder`."""

    def __init__(self, folder: str | None = None):
        self.folder = folder or default_cache_dir()

    def path(self, fingerprint: ReferenceFingerprint) -> str | None:
        key = fingerprint.key()
        return None if key is None else os.path.join(self.folder, f"{key}.safetensors")

    def lookup(self, fingerprint: ReferenceFingerprint) -> ReferenceLogps | None:
        """The stored reference for `fingerprint`, or None. A damaged entry is not used: a warning names it, and the
        caller recomputes and replaces it."""
        path = self.path(fingerprint)
        if path is None or not os.path.isfile(path):
            return None
        try:
            reference, saved, _ = read_reference_logps(path)
        except ReferenceFileError as error:
            logger.warning("Reference store entry not used: %s", error.problem)
            return None
        if mismatches(saved, fingerprint) or len(reference) != fingerprint.num_pairs:
            logger.warning("Reference store entry %s holds other inputs than its key says: not used.", path)
            return None
        return reference

    def write(self, fingerprint: ReferenceFingerprint, reference: ReferenceLogps, info=None) -> str | None:
        """Store `reference` under `fingerprint`'s key (atomically); its path, or None when there is no key."""
        path = self.path(fingerprint)
        if path is not None:
            save_reference_logps(path, reference, fingerprint, info)
        return path
