"""What `CPOConfig` and `ECPOCConfig` share: their base dataclass, validation, and the use of a plain DPOConfig."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar

from trl import DPOConfig

from .losses import check_beta

#: The preference terms both methods build on: DPO's sigmoid loss on summed ('sigmoid') or per-token averaged
#: ('sigmoid_norm') log-probs.
PREFERENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm")
#: Loss types that can be mixed in through `loss_weights` (they do not read the reference: `_trl_compat.ASSUMPTIONS`,
#: 'loss_weights').
MIXABLE_LOSS_TYPES = ("sft",)


def validate_dpo_fields(config) -> None:
    """Check the DPO fields a reference-margin method depends on.

    Raises `ValueError` naming the field and the fix. Runs in `__post_init__`, so bad input fails before any model is
    loaded. Nothing is rewritten: `loss_type` alone picks the log-prob space the method runs in ('sigmoid' sums over
    completion tokens, 'sigmoid_norm' averages per token).
    """
    method = config._method_name
    check_beta(config.beta)
    loss_type = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
    supported = PREFERENCE_LOSS_TYPES + MIXABLE_LOSS_TYPES
    unsupported = [lt for lt in loss_type if lt not in supported]
    if unsupported:
        raise ValueError(
            f"loss_type={loss_type} is not supported by {method}: {unsupported} cannot take the reference margin. "
            f"Use loss_type='sigmoid_norm' (per-token averaged log-probs, the released setting) or 'sigmoid' (summed), "
            "optionally mixed with 'sft' through loss_weights, e.g. loss_type=['sigmoid_norm', 'sft'], "
            "loss_weights=[1.0, 0.1]."
        )
    preference = [lt for lt in loss_type if lt in PREFERENCE_LOSS_TYPES]
    if len(preference) != 1:
        raise ValueError(
            f"loss_type={loss_type} must contain exactly one preference term ('sigmoid_norm' or 'sigmoid'), got "
            f"{len(preference)}. Use loss_type='sigmoid_norm', or ['sigmoid_norm', 'sft'] with loss_weights."
        )
    if config.f_divergence_type != "reverse_kl":
        raise ValueError(
            f"f_divergence_type={config.f_divergence_type!r} is not supported by {method}: its margin is defined on "
            "reverse-KL log-ratios. Use f_divergence_type='reverse_kl' (the default)."
        )
    if config.ld_alpha is not None:
        raise ValueError(
            f"ld_alpha={config.ld_alpha} (LD-DPO weighting) is not supported by {method}: the margin is computed from "
            "plain summed or averaged reference log-probs. Set ld_alpha=None and pick the space with loss_type "
            "('sigmoid_norm' averages per token)."
        )
    if config.precompute_ref_log_probs not in (None, True, False):
        raise ValueError(
            f"precompute_ref_log_probs={config.precompute_ref_log_probs!r} is invalid for {method}. Set it to None (the "
            "default: precompute when the data allows it, else a live reference), True or False."
        )


def from_dpo_config(args: DPOConfig, config_cls):
    """Turn a plain `DPOConfig` into `config_cls`, keeping every field exactly as the user's config has it.

    The method's own fields (e.g. `cpo_gamma`) take their defaults. The only DPO field read differently is
    `precompute_ref_log_probs`: DPOConfig's default `False` becomes `None`, so the trainer precomputes the reference
    when the data allows it and otherwise runs it live (`trl_cpo.reference_source.resolve_precompute`, which says
    which in one log line); an explicit `True` is kept. In particular `beta` and `loss_type` are kept, so a DPO script
    keeps its log-prob space and temperature (`CPOConfig` / `ECPOCConfig` carry the paper's settings).
    """
    dpo_fields = [f.name for f in dataclasses.fields(DPOConfig) if f.init]
    kwargs = {name: getattr(args, name) for name in dpo_fields}
    kwargs["precompute_ref_log_probs"] = True if kwargs["precompute_ref_log_probs"] else None
    return config_cls(**kwargs)


def field_default(f: dataclasses.Field):
    """A dataclass field's default value (calling its factory), or `dataclasses.MISSING`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclass
class _ReferenceMarginConfig(DPOConfig):
    """DPOConfig fields whose defaults CPO and E-CPOC change. Not used directly."""

    _method_name = "CPO / E-CPOC"

    beta: float = field(
        default=2.5,
        metadata={
            "help": "Inverse temperature of the preference loss. Default 2.5, the released CPO setting on "
            "per-token averaged log-probs (loss_type 'sigmoid_norm'); DPOConfig's 0.1 is a summed-log-prob scale."
        },
    )
    precompute_ref_log_probs: bool | None = field(
        default=None,
        metadata={
            "help": "Where the reference log-probs behind the per-pair margin (CPO) or target (E-CPOC) come from. None "
            "(default): computed once before training when the data allows it (map-style text data, no "
            "sync_ref_model), else live. True: always precomputed (streamed or vision data then fail as in TRL). "
            "False: live, from DPOTrainer's reference forward at each step."
        },
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid_norm"],
        metadata={
            "help": "The log-prob space of the method's preference term: 'sigmoid_norm' averages log-probs per "
            "completion token (the released setting, assumed by beta=2.5), 'sigmoid' sums them. 'sft' can be mixed "
            "in with loss_weights, e.g. ['sigmoid_norm', 'sft']."
        },
    )

    stop_on_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Stop training with an error when a training step's loss or reference margin is NaN or inf, "
            "before that step updates the weights (so no checkpoint holds NaN weights). False keeps TRL's behaviour: "
            "the step runs, the Trainer logs a filtered loss, and the weights can become NaN."
        },
    )

    pair_diagnostics: str = field(
        default="end",
        metadata={
            "help": "Per-pair diagnostics files, one JSON-lines file per split keyed by the dataset row (delta_ref, "
            "delta_pi, the method's target, misaligned / in-U / displaced / saturated flags, completion lengths), in "
            "<output_dir>/_diagnostics/ (kept out of push_to_hub). 'end': at the end of training, for the train set "
            "and every eval set; 'eval': also for the eval sets at every evaluation (in step-<N>/); 'no': none. Each "
            "file costs one no-grad forward of the policy over its split.",
            "choices": ["end", "eval", "no"],
        },
    )

    reference_logps_file: str | None = field(
        default=None,
        metadata={
            "help": "Train-set reference log-probs written by `trl-cpo audit` (its reference_logps.safetensors). If "
            "its fingerprint (model, tokenizer, tokenized data, max_length) matches this run's, the train-set "
            "reference precompute is skipped; otherwise training stops with an error naming what differs. Eval sets "
            "are still computed."
        },
    )
    reference_cache: bool = field(
        default=True,
        metadata={
            "help": "Look the precomputed reference log-probs up in the reference store before computing them, and "
            "store them after (trl_cpo.reference_store): a sweep over beta, cpo_gamma or anything else that does not "
            "change the reference pays the reference pass once. The key is the reference weights, the pairs' token "
            "ids, max_length / truncation_mode and the precision. False: always compute, store nothing."
        },
    )
    reference_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the reference store. Default: $TRL_CPO_REFERENCE_CACHE if set, else "
            "trl_cpo/reference beside the Hugging Face datasets cache."
        },
    )

    #: Method fields for which `None` means something (CPO's `cpo_auto_gamma`: off); `None` is refused for the others.
    _none_allowed: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        _refuse_none(self)
        self._check_method_hyperparameters()
        validate_dpo_fields(self)
        _check_reference_paths(self)
        check_output_dir_is_a_folder(self.output_dir)
        super().__post_init__()

    def _check_method_hyperparameters(self) -> None:
        raise NotImplementedError


def _check_reference_paths(config) -> None:
    """Config-time checks of the reference file and store settings (before any model loads)."""
    path = config.reference_logps_file
    if path is not None and (not isinstance(path, (str, os.PathLike)) or not str(path)):
        raise ValueError(
            f"reference_logps_file={path!r} is invalid: give the path of the reference_logps.safetensors that "
            "`trl-cpo audit` wrote, or leave it unset."
        )
    if path is not None and not os.path.isfile(path):
        raise ValueError(
            f"reference_logps_file={str(path)!r} does not exist. Run `trl-cpo audit --config <this training config>` "
            "first (it writes that file), or unset reference_logps_file to compute the reference in the trainer."
        )
    if not isinstance(config.reference_cache, bool):
        raise ValueError(f"reference_cache={config.reference_cache!r} is invalid. Set it to True or False.")
    folder = config.reference_cache_dir
    if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(
            f"reference_cache_dir={folder!r} is a file. Set it to a folder (created if missing), or leave it unset."
        )


def _refuse_none(config) -> None:
    """`None` in a method field (a YAML key left without a value, a script passing None) is not "use the default"."""
    shared = {f.name for f in dataclasses.fields(_ReferenceMarginConfig)}
    for f in dataclasses.fields(config):
        if f.name in shared or f.name in config._none_allowed or getattr(config, f.name, 0) is not None:
            continue
        default = field_default(f)
        raise ValueError(
            f"{f.name}=None is invalid: {f.name} has no unset value. Set it to a value (its default is {default!r}), "
            "or leave it out of the config to get the default."
        )


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_dir_is_a_folder(output_dir) -> None:
    """Refuse an `output_dir` that is an existing file or lies under one (no side effect: nothing is created)."""
    if output_dir is None:
        return
    existing = _nearest_existing(str(output_dir))
    if os.path.exists(existing) and not os.path.isdir(existing):
        given = os.path.abspath(os.path.expanduser(str(output_dir)))
        what = "is a file" if existing == given else f"lies under {existing}, which is a file"
        raise ValueError(
            f"output_dir={str(output_dir)!r} {what}, not a folder. Set output_dir to a folder path (it is created if "
            "missing), e.g. the name of this run."
        )


def ensure_writable_output_dir(config) -> None:
    """Refuse, before any model loads, an `output_dir` the Trainer could not create or write in (on the processes
    that save): a probe file is written and deleted in it, or in its nearest existing parent. Nothing is left behind."""
    import tempfile

    check_output_dir_is_a_folder(config.output_dir)
    if config.output_dir is None or not config.should_save:
        return
    try:
        with tempfile.NamedTemporaryFile(dir=_nearest_existing(config.output_dir), prefix=".trl-cpo-write-probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"output_dir={config.output_dir!r} cannot be written ({error.strerror or error}). Set output_dir to a "
            "folder this process can create and write to."
        ) from None
