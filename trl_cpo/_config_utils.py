"""What `CPOConfig` and `ECPOCConfig` share: their base dataclass, validation, and the upgrade of a plain DPOConfig."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from trl import DPOConfig

from .losses import check_beta

logger = logging.getLogger("trl_cpo")

#: The preference term both methods replace; `length_normalize` picks which of TRL's two spellings runs.
PREFERENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm")
#: Loss types that can be mixed in through `loss_weights` (they do not read the reference).
MIXABLE_LOSS_TYPES = ("sft",)


def normalize_and_validate(config) -> None:
    """Check the DPO fields a reference-margin method depends on; rewrite `loss_type` to the term TRL will run.

    Raises `ValueError` naming the field and the fix. Runs in `__post_init__`, so bad input fails before any model is
    loaded.
    """
    method = config._method_name
    check_beta(config.beta)
    loss_type = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
    supported = PREFERENCE_LOSS_TYPES + MIXABLE_LOSS_TYPES
    unsupported = [lt for lt in loss_type if lt not in supported]
    if unsupported:
        raise ValueError(
            f"loss_type={loss_type} is not supported by {method}: {unsupported} cannot take the reference margin. "
            f"Use loss_type='sigmoid' (the {method} term), optionally mixed with 'sft' through loss_weights, e.g. "
            "loss_type=['sigmoid', 'sft'], loss_weights=[1.0, 0.1]."
        )
    preference = [lt for lt in loss_type if lt in PREFERENCE_LOSS_TYPES]
    if len(preference) != 1:
        raise ValueError(
            f"loss_type={loss_type} must contain exactly one preference term ('sigmoid'), got {len(preference)}. "
            f"Use loss_type='sigmoid', or ['sigmoid', 'sft'] with loss_weights."
        )
    # `length_normalize` is the single switch for the log-prob scale: either spelling names the method's term, and TRL
    # gets 'sigmoid' (sums) or 'sigmoid_norm' (per-token averages) to match it.
    term = "sigmoid_norm" if config.length_normalize else "sigmoid"
    config.loss_type = [term if lt in PREFERENCE_LOSS_TYPES else lt for lt in loss_type]

    if config.f_divergence_type != "reverse_kl":
        raise ValueError(
            f"f_divergence_type={config.f_divergence_type!r} is not supported by {method}: its margin is defined on "
            "reverse-KL log-ratios. Use f_divergence_type='reverse_kl' (the default)."
        )
    if config.ld_alpha is not None:
        raise ValueError(
            f"ld_alpha={config.ld_alpha} (LD-DPO weighting) is not supported by {method}: the margin is computed from "
            "plain summed or averaged reference log-probs. Set ld_alpha=None and use length_normalize instead."
        )
    if not config.precompute_ref_log_probs:
        raise ValueError(
            f"precompute_ref_log_probs=False is not supported by {method}: the per-pair margin is computed once from "
            "the frozen reference before training. Set precompute_ref_log_probs=True (the default)."
        )
    if config.sync_ref_model:
        raise ValueError(
            f"sync_ref_model=True is not supported by {method}: the margins come from a frozen reference and would go "
            "stale. Set sync_ref_model=False."
        )


def upgrade_dpo_config(args: DPOConfig, config_cls):
    """Turn a plain `DPOConfig` into `config_cls`, keeping every field the user set.

    A field still at `DPOConfig`'s default takes `config_cls`'s default instead (for example `beta` 0.1 -> 2.5,
    `precompute_ref_log_probs` False -> True); a field that differs from `DPOConfig`'s default is kept. A field set
    explicitly to `DPOConfig`'s default value cannot be told apart from an unset one and is upgraded too. When `beta`
    is kept, so is the DPO loss's log-prob scale (`length_normalize` follows `loss_type`: 'sigmoid_norm' averages,
    'sigmoid' sums), since that beta was chosen for it; otherwise the method's default (averaged) applies.
    """
    dpo_fields = {f.name: f for f in dataclasses.fields(DPOConfig) if f.init}
    new_fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    kwargs, upgraded = {}, []
    for name, dpo_field in dpo_fields.items():
        value = getattr(args, name)
        if name in new_fields and field_default(new_fields[name]) != field_default(dpo_field):
            if value == field_default(dpo_field):
                upgraded.append(f"{name}: {value!r} -> {field_default(new_fields[name])!r}")
                continue
        kwargs[name] = value
    if "beta" in kwargs:
        # A beta the user chose is tuned to the log-prob scale of their DPO loss: keep that scale too.
        kwargs["length_normalize"] = "sigmoid_norm" in args.loss_type
    config = config_cls(**kwargs)
    logger.warning(
        "Got a plain DPOConfig: upgraded it to %s. Fields left at DPO defaults take %s defaults (%s); every other "
        "field is kept as set. %s fields: %s.",
        config_cls.__name__,
        config._method_name,
        "; ".join(upgraded) or "none",
        config._method_name,
        ", ".join(f"{name}={getattr(config, name)!r}" for name in new_fields if name not in dpo_fields),
    )
    return config


def field_default(f: dataclasses.Field):
    """A dataclass field's default value (calling its factory), or `dataclasses.MISSING`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclass
class _ReferenceMarginConfig(DPOConfig):
    """DPOConfig fields whose defaults CPO and E-CPOC change, plus the log-prob scale switch. Not used directly."""

    _method_name = "CPO / E-CPOC"

    beta: float = field(
        default=2.5,
        metadata={
            "help": "Inverse temperature of the preference loss. Default 2.5, the released CPO setting on "
            "length-normalized log-probs (DPOConfig's default 0.1 is a summed-log-prob scale)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute reference log-probs and the per-pair margin (CPO) or target (E-CPOC) once before training "
            "and for each eval set. Required: False is rejected."
        },
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "'sigmoid' (or 'sigmoid_norm') names the method's preference term; 'sft' can be mixed in with "
            "loss_weights. `length_normalize` alone decides whether TRL runs the term on summed ('sigmoid') or "
            "per-token averaged ('sigmoid_norm') log-probs, and `loss_type` is rewritten to that name."
        },
    )
    length_normalize: bool = field(
        default=True,
        metadata={
            "help": "Average log-probs per completion token, as the released code does (beta=2.5 assumes this "
            "scale), instead of summing them."
        },
    )

    def __post_init__(self):
        self._check_method_hyperparameters()
        normalize_and_validate(self)
        super().__post_init__()

    def _check_method_hyperparameters(self) -> None:
        raise NotImplementedError
