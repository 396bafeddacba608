r"""The method table: each reference-margin method declared once, with everything that differs between methods.

A method is its config class, its trainer, the target log-odds it trains `delta_pi` to beat (a function of the frozen
reference alone, built from `trl_cpo.losses`), the per-pair quantity it logs, and what it does to the pairs the
reference gets wrong (`effects`: the reference report and the audit print it). The trainers' shared base, the reference
report, the model card, the scripts (train, audit, demo) and the benchmarks read these fields; none of them branches on
a method's name.

A third method is a target function and an effects function here, its config and trainer classes, and one entry.

Every target is in the loss's log-prob space (summed, or per-token averaged for `loss_type='sigmoid_norm'`). CPO's
margin reads per-token reference log-probs whatever the space (see `trl_cpo.losses.cpo_margin`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .cpo_config import CPOConfig
from .ecpoc_config import ECPOCConfig
from .logps import is_length_normalized
from .losses import cpo_margin, ecpoc_target
from .reference import ReferenceLogps


class Pairs(NamedTuple):
    """A set of pairs as the reference sees them (what `Method.effects` and `Method.report_warnings` read)."""

    #: `delta_ref` in the loss's log-prob space.
    delta_ref: torch.Tensor
    #: Per-token (length-averaged) reference log-probs of the chosen and the rejected completions.
    chosen_per_token: torch.Tensor
    rejected_per_token: torch.Tensor


def _share(mask: torch.Tensor) -> float:
    """Exact share of True entries (a count over a count, not a float32 mean); 0 for no entry."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


# -- CPO ----------------------------------------------------------------------------------------------------------------


def cpo_method_target(
    reference: ReferenceLogps,
    length_normalized: bool,
    *,
    beta: float,
    gamma: float,
    margin_type: str,
    max_margin: float,
) -> torch.Tensor:
    """CPO: `delta_ref + m / beta`, `m = gamma * (1/pi_ref(y_w) + 1/pi_ref(y_l))` on per-token reference probs."""
    margin = cpo_margin(*reference.per_token(), gamma=gamma, margin_type=margin_type, max_margin=max_margin)
    return reference.delta_ref(length_normalized) + margin / beta


def cpo_effects(pairs: Pairs, *, beta: float, gamma: float, margin_type: str, max_margin: float) -> dict[str, float]:
    """CPO at these settings: the share of misaligned pairs (`delta_ref < 0`) lifted to a target `>= 0`, and the share
    of margins at `max_margin` (where `gamma` no longer matters)."""
    margin = cpo_margin(
        pairs.chosen_per_token, pairs.rejected_per_token, gamma=gamma, margin_type=margin_type, max_margin=max_margin
    )
    misaligned = pairs.delta_ref < 0
    lifted = (pairs.delta_ref + margin / beta)[misaligned] >= 0
    # A margin at the cap, to float32 round-off (the cap is applied by clamping, so capped values equal it).
    at_cap = margin.abs() >= max_margin * (1 - 1e-6)
    return {
        "cpo_gamma": float(gamma),
        "lifted_fraction": _share(lifted) if lifted.numel() else 1.0,
        "margin_at_cap_fraction": _share(at_cap) if gamma > 0 else 0.0,
    }


def cpo_report_warnings(report, pairs: Pairs, *, beta: float, gamma: float, margin_type: str, max_margin: float):
    """The reference report's warnings on CPO's settings, each naming the fix: most margins at the cap, or too few
    misaligned pairs lifted (`report` is the `trl_cpo.report.ReferenceReport` being built)."""
    warnings = []
    n_misaligned = int((pairs.delta_ref < 0).sum())
    chosen, rejected = pairs.chosen_per_token.double(), pairs.rejected_per_token.double()
    if report.margin_at_cap_fraction > 0.5:
        if margin_type == "inverse_prob":
            strength = torch.exp(torch.logaddexp(-chosen, -rejected))
        else:
            strength = (1 / chosen.clamp(max=-1e-6) + 1 / rejected.clamp(max=-1e-6)).abs()
        below = max_margin / torch.quantile(strength, 0.5).item()
        warnings.append(
            f"{report.margin_at_cap_fraction:.0%} of the CPO margins sit at cpo_max_margin={max_margin:g}: there "
            f"cpo_gamma no longer matters and CPO is DPO plus a constant. cpo_gamma below {below:.3g} keeps at least "
            "half of them under the cap (an untrained reference, whose per-token probabilities are near 1/vocab, caps "
            "them at any usual cpo_gamma)."
        )
    if n_misaligned and report.lifted_fraction < 0.5:
        fix = (
            f"cpo_gamma={report.recommended_cpo_gamma:.4g} lifts {report.lift_share:.0%} of them (set it, or "
            f"cpo_auto_gamma={report.lift_share:g})"
            if report.recommended_cpo_gamma is not None
            else report.recommendation
        )
        warnings.append(
            f"CPO at cpo_gamma={report.cpo_gamma:g} lifts only {report.lifted_fraction:.0%} of the {n_misaligned} pairs "
            f"the reference gets wrong out of U (target delta_ref + m/beta >= 0). {fix}; or use ECPOCTrainer, whose "
            "target never drops below ecpoc_gamma."
        )
    return warnings


# -- E-CPOC -------------------------------------------------------------------------------------------------------------


def ecpoc_method_target(
    reference: ReferenceLogps, length_normalized: bool, *, beta: float, gamma: float, tau: float, alpha: float
) -> torch.Tensor:
    """E-CPOC: `delta_ref + softplus(tau * (gamma - delta_ref)) / (alpha * tau)`, in the loss's space."""
    return ecpoc_target(*reference.in_loss_space(length_normalized), gamma=gamma, tau=tau, alpha=alpha)


def ecpoc_effects(pairs: Pairs, *, beta: float, gamma: float, tau: float, alpha: float) -> dict[str, float]:
    """E-CPOC at these settings: the share of misaligned pairs whose target is `>= 0` (with `alpha = 1` every one: the
    target is at least `max(delta_ref, gamma)`), and the share of pairs where the floor binds (`delta_ref < gamma`)."""
    delta_ref = pairs.delta_ref
    target = ecpoc_target(delta_ref, torch.zeros_like(delta_ref), gamma=gamma, tau=tau, alpha=alpha)
    misaligned = delta_ref < 0
    return {
        "ecpoc_gamma": float(gamma),
        "lifted_fraction": _share(target[misaligned] >= 0) if int(misaligned.sum()) else 1.0,
        "floor_binding_fraction": _share(delta_ref < gamma),
    }


# -- the entries --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One reference-margin method: where it lives, what it computes, logs and reports."""

    #: Short name used by `--method`, the demo and the audit.
    name: str
    #: Human-readable name (model cards, tables).
    title: str
    config_class: type
    #: "module:Class" of the trainer (imported on first use: the trainers import this table).
    trainer_path: str
    #: Config field -> keyword of `target` (the config uses TRL-style prefixed names, the math the paper's).
    fields: dict[str, str]
    #: Target log-odds per pair, in the loss's space.
    target: Callable[..., torch.Tensor]
    #: Name of the per-pair quantity logged every step (`cpo_margin`, `ecpoc_target`).
    metric_name: str
    #: Whether the logged quantity is the logit margin `beta * (target - delta_ref)` (else the target itself).
    metric_is_margin: bool
    #: The formula, as written on model cards.
    formula: str
    #: What the method does to a set of pairs at given settings (`Pairs`, beta and the target's keywords -> numbers).
    effects: Callable[..., dict[str, float]]
    #: Which of those numbers the reference report (`trl_cpo.report.ReferenceReport`) carries.
    report_keys: tuple[str, ...]
    #: The report's warnings on the method's settings, (report, `Pairs`, beta, the target's keywords) -> messages.
    report_warnings: Callable[..., list[str]] | None = None
    #: Config fields of the method that are not arguments of `target` (e.g. CPO's `cpo_auto_gamma`, which chooses
    #: `cpo_gamma` from the data): scripts accept them with the method's fields, model cards list them when set.
    config_only_fields: tuple[str, ...] = ()

    @property
    def trainer_class(self) -> type:
        module, name = self.trainer_path.split(":")
        return getattr(importlib.import_module(module), name)

    def settings(self, config) -> dict[str, object]:
        """The method's fields of `config`, by config field name. Fields `config` lacks (a config of another method, a
        plain DPOConfig) take this method's defaults."""
        return {name: getattr(config, name, getattr(self.config_class, name)) for name in self.fields}

    def _keywords(self, settings: dict[str, object]) -> dict[str, object]:
        return {self.fields[name]: value for name, value in settings.items()}

    def target_from_config(self, reference: ReferenceLogps, config) -> torch.Tensor:
        """Per-pair target log-odds for `config` (its beta, loss_type and method fields), in the loss's space."""
        kwargs = self._keywords(self.settings(config))
        return self.target(reference, is_length_normalized(config.loss_type), beta=config.beta, **kwargs)

    def effects_at(self, pairs: Pairs, beta: float, settings: dict[str, object]) -> dict[str, float]:
        """`effects` at `settings` (config field names, as `settings` returns them)."""
        return self.effects(pairs, beta=beta, **self._keywords(settings))

    def warnings_at(self, report, pairs: Pairs, beta: float, settings: dict[str, object]) -> list[str]:
        if self.report_warnings is None:
            return []
        return self.report_warnings(report, pairs, beta=beta, **self._keywords(settings))

    def metric(self, target: torch.Tensor, delta_ref: torch.Tensor, beta: float) -> torch.Tensor:
        return beta * (target - delta_ref) if self.metric_is_margin else target


METHODS: dict[str, Method] = {
    "cpo": Method(
        name="cpo",
        title="CPO",
        config_class=CPOConfig,
        trainer_path="trl_cpo.cpo_trainer:CPOTrainer",
        fields={"cpo_gamma": "gamma", "cpo_margin_type": "margin_type", "cpo_max_margin": "max_margin"},
        target=cpo_method_target,
        metric_name="cpo_margin",
        metric_is_margin=True,
        formula="loss = -log sigmoid(beta * (delta_pi - delta_ref) - m),  "
        "m = cpo_gamma * (1/pi_ref(y_w) + 1/pi_ref(y_l)) on per-token reference probabilities",
        effects=cpo_effects,
        report_keys=("cpo_gamma", "margin_at_cap_fraction", "lifted_fraction"),
        report_warnings=cpo_report_warnings,
        config_only_fields=("cpo_auto_gamma",),
    ),
    "ecpoc": Method(
        name="ecpoc",
        title="E-CPOC",
        config_class=ECPOCConfig,
        trainer_path="trl_cpo.ecpoc_trainer:ECPOCTrainer",
        fields={"ecpoc_gamma": "gamma", "ecpoc_tau": "tau", "ecpoc_alpha": "alpha"},
        target=ecpoc_method_target,
        metric_name="ecpoc_target",
        metric_is_margin=False,
        formula="loss = -log sigmoid(beta * (delta_pi - target)),  "
        "target = delta_ref + softplus(ecpoc_tau * (ecpoc_gamma - delta_ref)) / (ecpoc_alpha * ecpoc_tau)",
        effects=ecpoc_effects,
        report_keys=("floor_binding_fraction",),
    ),
}
#: The entry a config of no method (a plain `trl.DPOConfig`) is read as: CPOTrainer turns one into a CPOConfig, and
#: the reference report of a plain DPOTrainer says what CPO at its defaults would do.
PLAIN_DPO_CONFIG_METHOD = "cpo"


def method_for_config(config) -> Method:
    """The entry of `config`'s most derived config class; `PLAIN_DPO_CONFIG_METHOD`'s for a plain DPOConfig."""
    for cls in type(config).__mro__:
        for method in METHODS.values():
            if method.config_class is cls:
                return method
    if hasattr(config, "_method_name"):  # a reference-margin config no entry declares
        raise TypeError(f"{type(config).__name__} is not the config of any method in trl_cpo.METHODS.")
    return METHODS[PLAIN_DPO_CONFIG_METHOD]
