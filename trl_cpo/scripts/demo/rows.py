"""The rows of `trl-cpo demo`: which trainer each row trains, with which settings, and the target its loss has.

A row is TRL's own `DPOTrainer` (the DPO row) or an entry of `trl_cpo.methods.METHODS` at settings of its own: every
method row reads its method's fields from the flags of the same name, then the row's fixed settings, then the extra
flags it names (CPO-auto: ``--cpo_auto_gamma``). Adding a row is one `ROWS` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOSS_SPACE = "length-normalized log-probs (mean per completion token, EOS included)"


@dataclass(frozen=True)
class Row:
    """One row of the experiment."""

    #: Name of its `trl_cpo.methods.METHODS` entry; None for TRL's own DPOTrainer.
    method: str | None
    #: What the row is, in one line (the printed settings and results.json say it).
    description: str
    #: Settings of the row that differ from the flags of the same name.
    settings: dict[str, Any] = field(default_factory=dict)
    #: Config fields beyond the method's own that the row reads from the flags of the same name.
    flags: tuple[str, ...] = ()


#: Rows of the experiment, in the order they train and print. Every method row reads its other fields from the flags
#: of the same name.
ROWS: dict[str, Row] = {
    "DPO": Row(None, "TRL's own trl.DPOTrainer, loss_type='sigmoid_norm'"),
    "CPO": Row("cpo", "CPOTrainer at --cpo_gamma (released 0.05)", {"cpo_margin_type": "inverse_prob"}),
    "CPO-auto": Row(
        "cpo",
        "CPOTrainer with cpo_auto_gamma=--cpo_auto_gamma: cpo_gamma chosen by recommend_cpo_gamma on the train set",
        {"cpo_margin_type": "inverse_prob"},
        flags=("cpo_auto_gamma",),
    ),
    "CPO-inverse_logp": Row(
        "cpo",
        "CPOTrainer at --cpo_gamma with the released code's 1/logp_ref numerics",
        {"cpo_margin_type": "inverse_logp"},
    ),
    "E-CPOC": Row("ecpoc", "ECPOCTrainer at --ecpoc_gamma / --ecpoc_tau / --ecpoc_alpha"),
    "HyPO": Row(
        "hypo",
        "HyPOTrainer: target max(delta_ref, 0), E-CPOC's hard limit and the released code's default ('clip')",
    ),
}


def row_method(name: str):
    """The `trl_cpo.methods.METHODS` entry of a row (None for DPO)."""
    from trl_cpo.methods import METHODS

    key = ROWS[name].method
    return None if key is None else METHODS[key]


def row_settings(name: str, args) -> dict[str, Any]:
    """The method fields of a row's config (`args`: the `DemoArguments`): the flags of the same name, then the row's
    own settings, then the extra flags it reads."""
    method, row = row_method(name), ROWS[name]
    if method is None:
        return {}
    settings = {f: getattr(args, f) for f in method.fields if hasattr(args, f)}
    settings.update(row.settings)
    settings.update({f: getattr(args, f) for f in row.flags})
    return settings


def build_config(name: str, args, *, seed: int, output_dir: str):
    """The training config of row `name` (all rows on length-normalized log-probs, reference log-probs precomputed)."""
    method = row_method(name)
    if method is None:
        from trl import DPOConfig

        config_class = DPOConfig
    else:
        config_class = method.config_class
    return config_class(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        # The new name of gradient_checkpointing (TRL configs default that one to True).
        activation_checkpointing=False,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=args.eval_every,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        beta=args.beta,
        loss_type=["sigmoid_norm"],
        precompute_ref_log_probs=True,
        max_length=None,
        disable_tqdm=True,
        **row_settings(name, args),
    )


def make_trainer(name: str, model, config, train_dataset, tokenizer):
    """The row's trainer: TRL's DPOTrainer for DPO, its method's trainer class (`trl_cpo.trainers`) otherwise."""
    method = row_method(name)
    if method is None:
        from trl import DPOTrainer

        cls = DPOTrainer
    else:
        from trl_cpo.trainers import trainer_class

        cls = trainer_class(method)
    return cls(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer)


def swapped(reference):
    """The same pairs with chosen and rejected exchanged (what a flipped label shows the loss)."""
    from trl_cpo.reference import ReferenceLogps

    return ReferenceLogps(reference.rejected, reference.chosen, reference.rejected_lengths, reference.chosen_lengths)


def row_target(name: str, reference, config):
    """Per-pair target log-odds each row's loss pushes ``delta_pi`` past, in the space of ``config.loss_type``.

    DPO: ``delta_ref``; the methods: `trl_cpo.methods.Method.target_from_config` (what the trainers use), with
    ``config`` as the trainer holds it after training (so CPO-auto's chosen ``cpo_gamma``).
    """
    from trl_cpo.logps import is_length_normalized

    method = row_method(name)
    if method is None:
        return reference.delta_ref(is_length_normalized(config.loss_type))
    return method.target_from_config(reference, config)


def row_targets(name: str, reference, config):
    """(t1, t2): the row's target with the majority label and for the same pair with its label flipped."""
    return row_target(name, reference, config), row_target(name, swapped(reference), config)


def predicted_delta_pi(name: str, reference, config, label_noise: float):
    """Per-pair population optimum of the row's loss under `label_noise` (`optimum.population_optimum`)."""
    from .optimum import population_optimum

    return population_optimum(*row_targets(name, reference, config), beta=config.beta, label_noise=label_noise)
