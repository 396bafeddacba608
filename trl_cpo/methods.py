r"""The method table: each reference-margin method declared once.

A method is its config class, its trainer, the target log-odds it trains `delta_pi` to beat (a function of the frozen
reference alone, built from `trl_cpo.losses`), and the per-pair quantity it logs. The trainers' shared base, the
scripts (train, audit, demo) and the benchmark all dispatch through `METHODS`; a third method is one target function
and one entry here.

Every target is in the loss's log-prob space (summed, or per-token averaged for `loss_type='sigmoid_norm'`). CPO's
margin reads per-token reference log-probs whatever the space (see `trl_cpo.losses.cpo_margin`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cpo_config import CPOConfig
from .ecpoc_config import ECPOCConfig
from .logps import is_length_normalized
from .losses import cpo_margin, ecpoc_target
from .reference import ReferenceLogps


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


def ecpoc_method_target(
    reference: ReferenceLogps, length_normalized: bool, *, beta: float, gamma: float, tau: float, alpha: float
) -> torch.Tensor:
    """E-CPOC: `delta_ref + softplus(tau * (gamma - delta_ref)) / (alpha * tau)`, in the loss's space."""
    return ecpoc_target(*reference.in_loss_space(length_normalized), gamma=gamma, tau=tau, alpha=alpha)


@dataclass(frozen=True)
class Method:
    """One reference-margin method: where it lives, what it computes and what it logs."""

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
    #: Config fields of the method that are not arguments of `target` (e.g. CPO's `cpo_auto_gamma`, which chooses
    #: `cpo_gamma` from the data): scripts accept them with the method's fields, model cards list them when set.
    config_only_fields: tuple[str, ...] = ()

    @property
    def trainer_class(self) -> type:
        module, name = self.trainer_path.split(":")
        return getattr(importlib.import_module(module), name)

    def settings(self, config) -> dict[str, object]:
        """The method's fields of `config` (a config of this method, or any object with those attributes)."""
        return {field: getattr(config, field) for field in self.fields}

    def target_from_config(self, reference: ReferenceLogps, config) -> torch.Tensor:
        """Per-pair target log-odds for `config` (its beta, loss_type and method fields), in the loss's space."""
        kwargs = {self.fields[field]: value for field, value in self.settings(config).items()}
        return self.target(reference, is_length_normalized(config.loss_type), beta=config.beta, **kwargs)

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
    ),
}


def method_for_config(config) -> Method:
    """The entry whose config class `config` is an instance of (most derived first)."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    for method in METHODS.values():
        if isinstance(config, method.config_class):
            return method
    raise TypeError(f"{type(config).__name__} is not the config of any method in trl_cpo.METHODS.")
