"""What decides a set of reference log-probs: the key of the reference store (`trl_cpo.reference_store`).

The reference's per-pair log-probs depend on the reference weights, the token ids of every pair, the truncation that
decides which of those tokens are scored, and the precision of the forward. The fingerprint holds one digest or value
per component, so an error can name what differs; nothing that does not change the reference (beta, the method's
settings, the learning rate, the output folder) is in it, so a sweep over those reuses one stored reference.

- `model`: the reference's config (less bookkeeping keys such as `_name_or_path`) and the name, shape and dtype of
  every parameter. Under PEFT the reference is the base model with its adapter disabled, so adapter parameters are
  left out and `base_layer` / `original_module` names are read as the base model's;
- `model_weights`: a digest of a fixed sample of each parameter's values (up to `WEIGHT_SAMPLE` evenly spaced
  elements per tensor: cheap on an 8B model, and any fine-tune changes the sampled values); `None` when parameters
  are partitioned (DeepSpeed ZeRO-3), in which case the store is not used;
- `data`: the tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, in dataset order) after TRL's preparation,
  from the per-pair digests (`trl_cpo.data.pair_digests`): another dataset, order, subset, chat template or tokenizer
  shows up here;
- `max_length`, `truncation_mode`: TRL truncates in the collator, after tokenization;
- `precision`: the mixed precision the forward runs under (`bf16` / `fp16` autocast, or none).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import torch

from . import _trl_compat

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
    precision: str = "fp32"
    #: Descriptive only (named in error messages, not compared): where the model came from, and its dtype.
    model_name_or_path: str = ""
    dtype: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def key(self) -> str | None:
        """The store key: a digest of what decides the reference log-probs (not the tokenizer's own digest, whose
        effect is in the token ids, nor the descriptive fields). None when the weights cannot be read (ZeRO-3)."""
        if self.model_weights is None:
            return None
        parts = (self.model, self.model_weights, self.data, self.num_pairs, self.max_length, self.truncation_mode)
        digest = _digest()
        digest.update(json.dumps([*parts, self.precision]).encode())
        return digest.hexdigest()

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


def sample_positions(numel: int, count: int = WEIGHT_SAMPLE, device=None) -> torch.Tensor:
    """`count` evenly spaced positions in `range(numel)`, first and last included, in exact integer arithmetic.

    Float positions (`torch.linspace`) round to `numel` itself beyond float32's 2**24 integers: a 50257 x 768
    embedding (38.6M values) would index past its end.
    """
    steps = torch.arange(count, dtype=torch.int64, device=device)
    return steps * (numel - 1) // (count - 1)


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
            flat = flat[sample_positions(flat.numel(), device=flat.device)]
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
        precision=precision(trainer.args),
        model_name_or_path=str(getattr(model.config, "_name_or_path", "") or ""),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def precision(args) -> str:
    """The mixed precision the reference forward runs under: 'bf16', 'fp16' (autocast) or 'fp32' (none)."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


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
    if saved.precision != current.precision:
        found.append(f"precision (file: {saved.precision}; this run: {current.precision})")
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
