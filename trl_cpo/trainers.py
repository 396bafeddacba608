"""Which class trains each method: `TRAINERS` maps every entry of `trl_cpo.methods.METHODS` to its trainer class.

A base method's trainer is written by hand (`CPOTrainer`, `ECPOCTrainer`: each names its entry as its `method`); a
variant's (`trl_cpo.methods.variant`) is built here, once, from its base's trainer: the subclass `<class_prefix>Trainer`
(`HyPOTrainer`, `DPOBaselineTrainer`) whose `method` is the variant's entry, with the entry's model-card attributes.

This module imports the table and the trainers, and nothing in the package imports it back: the table does not know its
trainers (they import it), so the two never import each other.
"""

from __future__ import annotations

from . import _trl_compat
from .cpo_trainer import CPOTrainer
from .ecpoc_trainer import ECPOCTrainer
from .methods import METHODS, Method, describe_settings

#: The hand-written trainers, one per method that is not a variant (each the trainer of its `method`).
_BASE_TRAINERS = (CPOTrainer, ECPOCTrainer)


def _variant_trainer(method: Method, base_trainer: type) -> type:
    """The trainer of variant `method`: `base_trainer` with the variant's entry, docstring and model-card attributes."""
    namespace = {
        "method": method,
        "__module__": __name__,
        "__doc__": f"{method.title}: {base_trainer.__name__} at {describe_settings(method.pinned)}. {method.formula}",
    }
    card = method.card
    if card is not None:
        attributes = _trl_compat.card_attributes(tags=list(card.tags), name=card.name, paper=card.paper())
        namespace["_tag_names"], namespace["_name"], namespace["_paper"] = attributes
        if card.description is not None:
            namespace["_card_description"] = property(lambda self: card.description(self.args))
    return type(method.trainer_name, (base_trainer,), namespace)


def _build() -> dict[str, type]:
    trainers = {cls.method.name: cls for cls in _BASE_TRAINERS}
    for name, method in METHODS.items():  # a variant's base comes before it (`variant` takes the base's entry)
        if name not in trainers:
            if method.base is None:
                raise TypeError(
                    f"METHODS[{name!r}] has no trainer: list its class in trl_cpo.trainers._BASE_TRAINERS."
                )
            trainers[name] = _variant_trainer(method, trainers[method.base.name])
    return {name: trainers[name] for name in METHODS}


TRAINERS: dict[str, type] = _build()
"""Method name -> the class that trains it, for every entry of `METHODS`, in the table's order."""

HyPOTrainer = TRAINERS["hypo"]
"""HyPO's trainer: `ECPOCTrainer` at `ecpoc_gamma=0`, `ecpoc_tau=inf`, `ecpoc_alpha=1` (target `max(delta_ref, 0)`)."""

DPOBaselineTrainer = TRAINERS["dpo"]
"""The DPO baseline's trainer: `CPOTrainer` at `cpo_gamma=0`, which is exactly DPO's loss."""


def trainer_class(method: Method | str) -> type:
    """The class that trains `method`: an entry of `METHODS`, or its name."""
    name = method if isinstance(method, str) else method.name
    if name not in TRAINERS or not (isinstance(method, str) or METHODS[name] is method):
        raise KeyError(f"{name!r} is not an entry of trl_cpo.methods.METHODS ({', '.join(METHODS)}).")
    return TRAINERS[name]


def __getattr__(name: str):
    """Any variant's trainer class by its name (`trl_cpo.trainers.HyPOTrainer`), also one with no line above: pickle
    finds a trainer class here, by its `__module__`."""
    for cls in TRAINERS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
