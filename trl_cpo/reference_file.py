"""One reference pass: the train set's reference log-probs written by `trl-cpo audit` and read back by the trainers.

An audit runs the frozen reference over every training pair; so does the trainers' precompute. With
`reference_logps_file` set in `CPOConfig` / `ECPOCConfig`, a trainer reads the audit's file instead of running the
reference again, when the file was computed on the same inputs, and refuses it otherwise. "Same inputs" is checked
with a fingerprint, one digest per component so an error can name what differs:

- `model`: the reference's config (less bookkeeping keys such as `_name_or_path`) and the name, shape and dtype of
  every parameter. Under PEFT the reference is the base model with its adapter disabled, so adapter parameters are
  left out and `base_layer` / `original_module` names are read as the base model's;
- `model_weights`: a digest of a fixed sample of each parameter's values (up to `WEIGHT_SAMPLE` evenly spaced
  elements per tensor: cheap on an 8B model, and any fine-tune changes the sampled values); `None` when parameters
  are partitioned (DeepSpeed ZeRO-3), in which case weights are not compared (the structure still is);
- `tokenizer`: the tokenizer's serialized vocabulary and rules, chat template and special tokens;
- `data`: the tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, in dataset order) after TRL's preparation,
  so another dataset, order, subset, chat template or tokenizer shows up here;
- `max_length` and `truncation_mode`: TRL truncates in the collator, after tokenization, so they are compared as
  values.

The file is a safetensors file with the four tensors of `trl_cpo.reference.ReferenceLogps` (summed log-probs and
completion lengths, float32) and JSON metadata (`format`, `version`, `fingerprint`, `info`). Only the train set is
covered: eval sets are still computed by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch

from . import _trl_compat

if TYPE_CHECKING:  # imported where used, so that importing the configs stays light
    from .reference import ReferenceLogps

#: `format` written into the file's metadata, checked on read.
FORMAT = "trl_cpo.reference_logps"
#: Version of the file layout, checked on read.
VERSION = 1
#: File name `trl-cpo audit` writes into its output folder unless `reference_logps_file` names another path.
DEFAULT_FILE_NAME = "reference_logps.safetensors"
#: Parameter values sampled per tensor for the `model_weights` digest.
WEIGHT_SAMPLE = 1024
#: Config keys that do not change what the reference computes.
_CONFIG_KEYS_IGNORED = ("transformers_version", "use_cache", "architectures")
#: Columns of TRL's tokenized preference dataset that the data digest covers.
DATA_COLUMNS = _trl_compat.TOKENIZED_COLUMNS


@dataclass(frozen=True)
class ReferenceFingerprint:
    """What a set of reference log-probs was computed from. See the module docstring for each field."""

    model: str
    model_weights: str | None
    tokenizer: str
    data: str
    num_pairs: int
    max_length: int | None
    truncation_mode: str
    #: Descriptive only (named in error messages, not compared): where the model came from, and its dtype.
    model_name_or_path: str = ""
    dtype: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ReferenceFingerprint:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _digest():
    return hashlib.blake2b(digest_size=16)


def _reference_parameter_name(name: str, adapter_names: set[str]) -> str | None:
    """The base model's name of a (possibly PEFT-wrapped) parameter, or None for an adapter's own parameter."""
    parts = name.split(".")
    if any(part in adapter_names for part in parts):
        return None  # lora_A.default.weight, modules_to_save.default.weight, ...
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def model_digests(model: torch.nn.Module) -> tuple[str, str | None]:
    """(`model`, `model_weights`) digests of the reference `model` (a PEFT model counts as its base model)."""
    adapter_names = set(getattr(model, "peft_config", {}) or {})
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
    structure = _digest()
    structure.update(json.dumps(config, sort_keys=True, default=str).encode())
    weights = _digest()
    partitioned = False
    named = sorted(
        (base_name, parameter)
        for name, parameter in model.named_parameters()
        if (base_name := _reference_parameter_name(name, adapter_names)) is not None
    )
    for name, parameter in named:
        # ZeRO-3 keeps the full shape in `ds_shape` and an empty local tensor.
        shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
        structure.update(f"{name}:{tuple(shape)}:{parameter.dtype};".encode())
        tensor = parameter.detach()
        if tensor.numel() == 0 and math.prod(shape) > 0:
            partitioned = True
            continue
        flat = tensor.reshape(-1)
        if flat.numel() > WEIGHT_SAMPLE:
            index = torch.linspace(0, flat.numel() - 1, WEIGHT_SAMPLE, device=flat.device).long()
            flat = flat[index]
        weights.update(name.encode())
        weights.update(flat.to(torch.float64).cpu().numpy().tobytes())
    return structure.hexdigest(), None if partitioned else weights.hexdigest()


def tokenizer_digest(processing_class) -> str:
    """Digest of the tokenizer's rules and vocabulary, chat template and special tokens."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    digest = _digest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None), default=str).encode())
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


def data_digest(dataset, row_digests=None) -> str:
    """Digest of a tokenized preference dataset's `prompt_ids`, `chosen_ids` and `rejected_ids`, in order.

    Built from the per-pair digests (`trl_cpo.data.pair_digests`, which resume also binds checkpoints to); pass them
    as `row_digests` when they are already computed.
    """
    from .data import pair_digests

    missing = [c for c in DATA_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Cannot fingerprint a dataset without the tokenized columns {missing}.")
    rows = pair_digests(dataset) if row_digests is None else row_digests
    digest = _digest()
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()


def reference_fingerprint(trainer, dataset, row_digests=None) -> ReferenceFingerprint:
    """The fingerprint of the train-set reference log-probs `trainer` would compute on its tokenized `dataset`.

    `row_digests`: the dataset's `trl_cpo.data.pair_digests`, if already computed."""
    # The model the precompute reads (`trl_cpo.reference`): a separate reference, or the policy before any step.
    model = trainer.ref_model or trainer.model
    structure, weights = model_digests(model)
    return ReferenceFingerprint(
        model=structure,
        model_weights=weights,
        tokenizer=tokenizer_digest(trainer.processing_class),
        data=data_digest(dataset, row_digests),
        num_pairs=len(dataset),
        max_length=trainer.args.max_length,
        truncation_mode=trainer.args.truncation_mode,
        model_name_or_path=str(getattr(model.config, "_name_or_path", "") or ""),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def mismatches(saved: ReferenceFingerprint, current: ReferenceFingerprint) -> list[str]:
    """What differs between the file's fingerprint and this run's, one phrase per component (empty if they match)."""
    found = []
    if saved.model != current.model:
        found.append(
            f"model (file: {saved.model_name_or_path or '?'} in {saved.dtype or '?'}; this run: "
            f"{current.model_name_or_path or '?'} in {current.dtype or '?'}; architecture, dtype or quantization "
            "differ)"
        )
    elif None not in (saved.model_weights, current.model_weights) and saved.model_weights != current.model_weights:
        found.append(
            f"model weights (same architecture, other values: file {saved.model_name_or_path or '?'}, this run "
            f"{current.model_name_or_path or '?'})"
        )
    if saved.tokenizer != current.tokenizer:
        found.append("tokenizer")
    if saved.max_length != current.max_length or saved.truncation_mode != current.truncation_mode:
        found.append(
            f"max_length (file: {saved.max_length}, {saved.truncation_mode}; this run: {current.max_length}, "
            f"{current.truncation_mode})"
        )
    if saved.data != current.data:
        count = (
            f"the file has {saved.num_pairs} pairs, this train set {current.num_pairs}"
            if saved.num_pairs != current.num_pairs
            else f"{current.num_pairs} pairs on both sides, other tokens or order"
        )
        found.append(f"data ({count})")
    return found


def save_reference_logps(
    path: str, reference: ReferenceLogps, fingerprint: ReferenceFingerprint, info: dict | None = None
) -> None:
    """Write `reference` with its fingerprint to `path` (atomically: a reader never sees half a file)."""
    from safetensors.torch import save_file

    from .reference import ReferenceLogps

    tensors = {f.name: getattr(reference, f.name).float().contiguous().cpu() for f in fields(ReferenceLogps)}
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "fingerprint": json.dumps(fingerprint.to_dict()),
        "info": json.dumps(info or {}, default=str),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def read_reference_logps(path: str) -> tuple[ReferenceLogps, ReferenceFingerprint, dict]:
    """(reference log-probs, fingerprint, info) from a file `save_reference_logps` wrote; `ValueError` otherwise."""
    from safetensors import SafetensorError, safe_open

    from .reference import ReferenceLogps

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"reference_logps_file={path!r} is not a readable safetensors file ({error}). Point it at the "
            f"{DEFAULT_FILE_NAME} that `trl-cpo audit` wrote."
        ) from None
    if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
        raise ValueError(
            f"reference_logps_file={path!r} is not a trl-cpo reference log-probs file of version {VERSION} (format "
            f"{metadata.get('format')!r}, version {metadata.get('version')!r}). Recompute it with `trl-cpo audit`."
        )
    reference = ReferenceLogps(**{f.name: tensors[f.name] for f in fields(ReferenceLogps)})
    fingerprint = ReferenceFingerprint.from_dict(json.loads(metadata["fingerprint"]))
    return reference, fingerprint, json.loads(metadata.get("info", "{}"))


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
        raise ValueError(
            f"reference_logps_file={path!r} holds {len(reference)} pairs but its fingerprint says "
            f"{saved.num_pairs}: the file is damaged. Recompute it with `trl-cpo audit`."
        )
    return reference


def check_reference_logps_file(path: str | None) -> None:
    """Config-time check of `reference_logps_file` (before any model loads): a path to an existing file, or None."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(
            f"reference_logps_file={path!r} is invalid: give the path of the {DEFAULT_FILE_NAME} that `trl-cpo audit` "
            "wrote, or leave it unset."
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"reference_logps_file={str(path)!r} does not exist. Run `trl-cpo audit --config <this training config>` "
            "first (it writes that file), or unset reference_logps_file to compute the reference in the trainer."
        )
