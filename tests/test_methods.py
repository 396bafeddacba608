"""The method table (`trl_cpo.methods`): a variant of a method is one entry, with its classes derived from its base's.

The DPO baseline is such an entry (CPO at cpo_gamma=0), and so is HyPO: E-CPOC at ecpoc_gamma=0, ecpoc_tau=inf,
ecpoc_alpha=1, whose target is max(delta_ref, 0) (tests/test_hypo.py checks it against the released formula).
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from helpers import CPU

from trl_cpo import CPOConfig, CPOTrainer, ECPOCTrainer, trainers
from trl_cpo.methods import METHODS, Pairs, method_for_config, variant
from trl_cpo.reference import ReferenceLogps
from trl_cpo.trainers import TRAINERS, trainer_class


def hypo():
    return METHODS["hypo"]


def reference():
    lengths = torch.tensor([2.0, 3.0, 1.0, 4.0])
    return ReferenceLogps(
        torch.tensor([-6.0, -3.0, -1.0, -4.0]), torch.tensor([-2.0, -9.0, -1.5, -4.0]), lengths, lengths
    )


def test_the_dpo_baseline_is_cpo_at_gamma_zero():
    dpo, cpo = METHODS["dpo"], METHODS["cpo"]
    assert dpo.base is cpo and dpo.flags == () and dpo.pinned["cpo_gamma"] == 0.0
    config = dpo.config_class(**CPU)
    assert isinstance(config, CPOConfig) and config.cpo_gamma == 0.0 and config.cpo_auto_gamma is None
    with pytest.raises(TypeError, match="cpo_gamma"):  # pinned: not an argument (nor a flag)
        dpo.config_class(**CPU, cpo_gamma=0.05)
    assert method_for_config(config) is dpo and method_for_config(CPOConfig(**CPU)) is cpo
    ref = reference()
    torch.testing.assert_close(dpo.target_from_config(ref, config), ref.delta_ref(True))  # DPO's target
    assert dpo.settings(config) == {"cpo_gamma": 0.0, "cpo_margin_type": "inverse_prob", "cpo_max_margin": 10.0}
    trainer = trainer_class(dpo)
    assert trainer.__name__ == "DPOBaselineTrainer" and issubclass(trainer, CPOTrainer) and trainer.method is dpo
    assert trainer._name == "DPO baseline (of a CPO comparison)" and "dpo" in trainer._tag_names
    assert pickle.loads(pickle.dumps(config)).cpo_gamma == 0.0  # the Trainer pickles its args (training_args.bin)


def test_every_entry_has_its_trainer_class():
    assert list(TRAINERS) == list(METHODS)
    for name, method in METHODS.items():
        cls = TRAINERS[name]
        assert cls.method is method and trainer_class(name) is cls and trainer_class(method) is cls
        assert getattr(trainers, cls.__name__) is cls and pickle.loads(pickle.dumps(cls)) is cls  # found by name
    assert trainers.HyPOTrainer is TRAINERS["hypo"] and trainers.DPOBaselineTrainer is TRAINERS["dpo"]
    assert trainers.HyPOTrainer.__module__ == trainers.DPOBaselineTrainer.__module__ == "trl_cpo.trainers"
    with pytest.raises(KeyError, match="not an entry"):
        trainer_class("nope")
    with pytest.raises(KeyError, match="not an entry"):  # a Method, but not the table's
        trainer_class(dataclasses.replace(METHODS["hypo"]))
    for method in (METHODS["hypo"], METHODS["dpo"]):  # the Trainer pickles its args (training_args.bin)
        config = method.config_class(**CPU)
        assert type(pickle.loads(pickle.dumps(config))) is method.config_class
        assert method.config_class.__module__ == "trl_cpo.methods"


def test_a_variant_is_one_entry():
    method = hypo()
    config = method.config_class(**CPU)
    assert (config.ecpoc_gamma, config.ecpoc_tau, config.ecpoc_alpha) == (0.0, math.inf, 1.0)
    ref = reference()
    delta_ref = ref.delta_ref(True)
    torch.testing.assert_close(method.target_from_config(ref, config), delta_ref.clamp(min=0))
    effects = method.effects_at(Pairs(delta_ref, *ref.per_token()), config.beta, method.settings(config))
    assert effects["lifted_fraction"] == 1.0
    assert effects["floor_binding_fraction"] == int((delta_ref < 0).sum()) / len(delta_ref)
    trainer = trainer_class(method)
    assert issubclass(trainer, ECPOCTrainer) and trainer.method is method and trainer._name == "HyPO"
    assert method.metric_name == "ecpoc_target" and method.config_class._method_name == "HyPO"
    with pytest.raises(ValueError, match="not settings of ecpoc"):
        variant(METHODS["ecpoc"], name="x", title="X", class_prefix="X", pinned={"cpo_gamma": 0.0}, formula="")
