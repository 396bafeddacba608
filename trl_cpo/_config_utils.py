"""Validation and DPOConfig upgrade shared by `CPOConfig` and `ECPOCConfig`."""

from __future__ import annotations

import dataclasses
import logging
import math

from trl import DPOConfig

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
    if not isinstance(config.beta, (int, float)) or not math.isfinite(config.beta) or config.beta <= 0:
        raise ValueError(
            f"beta={config.beta!r} is invalid for {method}: it must be a finite number > 0 (the margin enters the "
            "loss as margin/beta). Set beta to e.g. 2.5 (length-normalized log-probs)."
        )
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
    if preference[0] == "sigmoid_norm" and not config.length_normalize:
        raise ValueError(
            "loss_type='sigmoid_norm' averages log-probs per token but length_normalize=False asks for sums. "
            "Set length_normalize=True, or loss_type='sigmoid'."
        )
    # `length_normalize` is the single switch for the log-prob scale: TRL's 'sigmoid' sums, 'sigmoid_norm' averages.
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
    explicitly to `DPOConfig`'s default value cannot be told apart from an unset one and is upgraded too.
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
