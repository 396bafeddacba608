r"""The method table: each reference-margin method declared once, with everything that differs between methods.

A method is its config class, the target log-odds it trains `delta_pi` to beat (a function of the frozen reference
alone, built from `trl_cpo.losses`), the per-pair quantity it logs, and what it does to the pairs the reference gets
wrong (`effects`: the reference report and the audit print it). The trainers' shared base, the reference report, the
model card, the scripts (train, audit, demo) and the benchmarks read these fields; none of them branches on a method's
name. Which class trains a method is `trl_cpo.trainers.TRAINERS` (the trainers import this table; it imports none of
them).

Adding a method:

- a setting of an existing method under its own name is one `variant` entry and nothing else. The DPO baseline below is
  CPO at `cpo_gamma=0`, and HyPO (the released code's default) is E-CPOC at `ecpoc_gamma=0, ecpoc_tau=inf,
  ecpoc_alpha=1` (target `max(delta_ref, 0)`). A variant's config class derives from its base's, with every setting
  of the base pinned (so they are no flags of `--method <variant>`); `trl_cpo.trainers` builds its trainer class from
  its base's;
- a new objective is a target function and an effects function here, a config class, one `Method` entry, and a trainer
  class (whose `method` is its entry) listed in `trl_cpo.trainers._BASE_TRAINERS`.

Every target is in the loss's log-prob space (summed, or per-token averaged for `loss_type='sigmoid_norm'`). CPO's
margin reads per-token reference log-probs whatever the space (see `trl_cpo.losses.cpo_margin`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import _cards, _trl_compat
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
            f"cpo_auto_gamma={report.lift_share:g}); or use ECPOCTrainer, whose target never drops below ecpoc_gamma."
            if report.recommended_cpo_gamma is not None
            else report.recommendation  # why no cpo_gamma does it, naming ECPOCTrainer
        )
        warnings.append(
            f"CPO at cpo_gamma={report.cpo_gamma:g} lifts only {report.lifted_fraction:.0%} of the {n_misaligned} pairs "
            f"the reference gets wrong out of U (target delta_ref + m/beta >= 0). {fix}"
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
class VariantCard:
    """What the model card of a variant's run says in place of its base's (TRL's trainer card attributes)."""

    tags: tuple[str, ...]
    name: str
    #: The paper the card cites ({"title", "id", "citation"}), called when the trainer class is built.
    paper: Callable[[], dict[str, str]]
    #: The card's description paragraph for a run's config; None: the card's own.
    description: Callable[[object], str] | None = None


@dataclass(frozen=True)
class Method:
    """One reference-margin method: its config class, what it computes, logs and reports (its trainer class:
    `trl_cpo.trainers.trainer_class`)."""

    #: Short name used by `--method`, the demo and the audit.
    name: str
    #: Human-readable name (model cards, tables).
    title: str
    config_class: type
    #: The method's own settings: config field -> keyword of `target` (TRL-style prefixed names, the paper's). Empty
    #: for a variant, whose target is its base's at the pinned settings.
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
    #: A variant's base entry, the value of each of the base's settings it pins, the name and model card of its
    #: trainer class (which `trl_cpo.trainers` builds).
    base: Method | None = None
    pinned: dict[str, object] = field(default_factory=dict)
    trainer_name: str | None = None
    card: VariantCard | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        """The config fields the scripts take for this method beyond DPOConfig's (none for a variant)."""
        return (*self.fields, *self.config_only_fields)

    def settings(self, config) -> dict[str, object]:
        """The target's settings in `config`, by config field name (a variant: its base's, at the pinned values).
        Fields `config` lacks (a config of another method, a plain DPOConfig) take this method's defaults."""
        names = self.base.fields if self.base is not None else self.fields
        return {name: getattr(config, name, getattr(self.config_class, name)) for name in names}

    def _keywords(self, settings: dict[str, object]) -> dict[str, object]:
        names = self.base.fields if self.base is not None else self.fields
        return {names[name]: value for name, value in settings.items()}

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


def variant(base: Method, *, name: str, title: str, class_prefix: str, pinned: dict, formula: str, card=None):
    """`base` under its own name with every setting pinned: the values in `pinned`, the base config's defaults for the
    rest. Its config class `<class_prefix>Config` subclasses the base's with those fields fixed (`init=False`, so
    neither arguments nor flags); its trainer `<class_prefix>Trainer` (built by `trl_cpo.trainers`) subclasses the
    base's, with `card`'s model-card attributes (a `VariantCard`; None keeps the base's)."""
    settings = {f: pinned.get(f, getattr(base.config_class, f)) for f in base.flags}
    if set(pinned) - set(settings):
        raise ValueError(f"{name}: {sorted(set(pinned) - set(settings))} are not settings of {base.name}.")
    config_fields = [
        (f, base.config_class.__dataclass_fields__[f].type, field(default=value, init=False))
        for f, value in settings.items()
    ]
    described = describe_settings(settings)
    doc = f"`{base.config_class.__name__}` of the {title} ({base.title} at {described}); no field to set."
    config_class = dataclasses.make_dataclass(
        f"{class_prefix}Config",
        config_fields,
        bases=(base.config_class,),
        namespace={"_method_name": title, "__module__": __name__, "__doc__": doc},
    )
    return dataclasses.replace(
        base,
        name=name,
        title=title,
        config_class=config_class,
        fields={},
        config_only_fields=(),
        formula=formula,
        base=base,
        pinned=settings,
        trainer_name=f"{class_prefix}Trainer",
        card=card,
    )


def describe_settings(settings: dict[str, object]) -> str:
    """`name=value, ...`: how a variant's docstrings state its pinned settings."""
    return ", ".join(f"{name}={value!r}" for name, value in settings.items())


METHODS: dict[str, Method] = {
    "cpo": Method(
        name="cpo",
        title="CPO",
        config_class=CPOConfig,
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
#: The DPO baseline of a CPO comparison: exactly DPO's loss, with everything else (reference, data, metrics) CPO's.
METHODS["dpo"] = variant(
    METHODS["cpo"],
    name="dpo",
    title="DPO-baseline",
    class_prefix="DPOBaseline",
    pinned={"cpo_gamma": 0.0},
    formula="loss = -log sigmoid(beta * (delta_pi - delta_ref)): DPO's loss (the CPO loss at cpo_gamma = 0)",
    card=VariantCard(
        tags=("trl", "dpo", "trl-cpo"),
        name="DPO baseline (of a CPO comparison)",
        paper=_trl_compat.dpo_paper,
        description=_cards.dpo_baseline_description,
    ),
)
#: HyPO (Yuan et al., ICLR 2026, arXiv:2602.11902), the released CPO code's default (`easy_version='clip'`): DPO with
#: the target `max(delta_ref, 0)`, E-CPOC's hard limit.
METHODS["hypo"] = variant(
    METHODS["ecpoc"],
    name="hypo",
    title="HyPO",
    class_prefix="HyPO",
    pinned={"ecpoc_gamma": 0.0, "ecpoc_tau": math.inf, "ecpoc_alpha": 1.0},
    formula="loss = -log sigmoid(beta * (delta_pi - max(delta_ref, 0))): HyPO, E-CPOC's hard limit (ecpoc_gamma = 0, "
    "ecpoc_tau = inf, ecpoc_alpha = 1)",
    card=VariantCard(
        tags=("trl", "hypo", "trl-cpo"), name="HyPO", paper=_cards.hypo_paper, description=_cards.hypo_description
    ),
)
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


def __getattr__(name: str):
    """The variants' config classes, by name (`trl_cpo.methods.DPOBaselineConfig`): pickle finds the class of a saved
    config (the Trainer's `training_args.bin`) here. (Their trainer classes are `trl_cpo.trainers`'.)"""
    for method in globals().get("METHODS", {}).values():
        if method.base is not None and name == method.config_class.__name__:
            return method.config_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
