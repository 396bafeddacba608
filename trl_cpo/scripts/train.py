# Copyright the trl-cpo authors. Licensed under the Apache License, Version 2.0.
"""
`trl-cpo train`: train with CPO or E-CPOC (Constrained Preference Optimization, arXiv:2605.20834), or the matching DPO
baseline.

Not TRL's Contrastive Preference Optimization (`trl.experimental.cpo`): same acronym, different algorithm.

Shaped like TRL's `trl/scripts/dpo.py`: one `TrlParser` over script, training, model and dataset-mixture arguments;
`--config FILE.yaml` sets defaults and any command-line flag overrides them. `--method` picks the trainer, so one
config gives CPO, E-CPOC and the DPO baseline on identical settings:

- `cpo`   -> `trl_cpo.CPOTrainer`   (`--cpo_gamma`, `--cpo_margin_type`, `--cpo_max_margin`, `--cpo_auto_gamma`)
- `ecpoc` -> `trl_cpo.ECPOCTrainer` (`--ecpoc_gamma`, `--ecpoc_tau`, `--ecpoc_alpha`)
- `dpo`   -> the CPO trainer at `cpo_gamma=0`, which is exactly DPO's loss with the same `--beta`, the same
             `--loss_type` log-prob space ('sigmoid_norm' averages per token, 'sigmoid' sums) and the same
             precomputed reference, and logs the same U-space diagnostics.

The trainers come from `trl_cpo.methods.METHODS`. Fields of a method other than `--method`'s are ignored (with a
warning), so one config can carry both methods' settings.

    trl-cpo train --config recipes/configs/tiny_cpu.yaml                      # one process
    accelerate launch -m trl_cpo.scripts.train --config FILE.yaml             # several processes / GPUs
    accelerate launch recipes/cpo_llama3.py --config FILE.yaml                # the same, through the recipe

`--dataset_name` takes a Hub dataset, a local JSON / JSON-lines / Parquet / CSV file, or a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`. `--push_to_hub --hub_dry_run true` writes the folder and card a
push would upload into `OUTPUT_DIR/_hub_dry_run/`, offline, and uploads nothing. See recipes/README.md for the setups.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser

from trl_cpo import _trl_compat
from trl_cpo.cpo_config import CPOConfig
from trl_cpo.cpo_trainer import CPOTrainer
from trl_cpo.dataset_loading import drop_redundant_prompt, load_datasets, load_preference_dataset, split
from trl_cpo.logps import is_length_normalized
from trl_cpo.losses import MARGIN_TYPES
from trl_cpo.methods import METHODS as METHOD_TABLE
from trl_cpo.model_card import PAPER_ID, write_hub_dry_run

logger = logging.getLogger(__name__)

#: The methods of `trl_cpo.methods.METHODS`, plus the DPO baseline (the CPO trainer at cpo_gamma=0).
METHODS = (*METHOD_TABLE, "dpo")
#: Fields each method reads beyond DPOConfig's: its math fields and its config-only ones (CPO's cpo_auto_gamma).
METHOD_FIELDS = {
    **{name: (*method.fields, *method.config_only_fields) for name, method in METHOD_TABLE.items()},
    "dpo": (),
}
ALL_METHOD_FIELDS = tuple(dict.fromkeys(field for fields in METHOD_FIELDS.values() for field in fields))


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CPOScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus the method choice, what the model card says, and the Hub dry run."""

    method: str = field(
        default="cpo",
        metadata={
            "help": "Which objective to train: 'cpo' (CPO, soft constraint), 'ecpoc' (E-CPOC, hard constraint) or "
            "'dpo' (the DPO baseline: the CPO trainer at cpo_gamma=0, same beta and loss_type).",
            "choices": list(METHODS),
        },
    )
    model_card_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset named on the model card (and in its `datasets:` metadata when it is a Hub id), e.g. the "
            "Hub id a local copy came from. Defaults to `dataset_name` or the paths of the `datasets` mixture; local "
            "paths are named by their base name and never linked."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model (e.g. meta-llama/Meta-Llama-3-8B-Instruct), for the model card's "
            "`base_model:` metadata and link when `model_name_or_path` is a local folder. Without it a local base is "
            "named as local, without a link."
        },
    )
    model_card_license: str | None = field(
        default=None,
        metadata={
            "help": "License written into the model card's metadata (e.g. 'llama3', 'apache-2.0'). Defaults to the "
            "license on the base model's own card (its local README.md, or the Hub's unless HF_HUB_OFFLINE is set)."
        },
    )
    hub_dry_run: bool = field(
        default=False,
        metadata={
            "help": "With --push_to_hub: train, then write exactly the files and card the final push would upload "
            "into OUTPUT_DIR/_hub_dry_run/ and upload nothing (no Hub repo is created; works offline)."
        },
    )


@dataclass
class CPORecipeConfig(DPOConfig):
    """Every `DPOConfig` field plus the union of the CPO and E-CPOC fields, as read from the CLI and the YAML file.

    Only a container for parsing: `TrainingArguments.__post_init__` is deliberately not run here. `to_trainer_config`
    builds the real `CPOConfig` / `ECPOCConfig` / `DPOBaselineConfig` from the raw values, so that class validates and
    post-processes them exactly once. Method fields left unset (`None`) take the method's own default.
    """

    beta: float = field(
        default=2.5,
        metadata={
            "help": "Inverse temperature of the preference loss, for all three methods. 2.5 is the released CPO "
            "setting on per-token averaged log-probs (loss_type 'sigmoid_norm'); DPOConfig's 0.1 is a summed scale."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Must stay True: the reference log-probs and margins are computed once before training."},
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid_norm"],
        metadata={
            "help": "Log-prob space of the preference term, for all three methods (the DPO baseline included): "
            "'sigmoid_norm' averages per completion token (the released code's scale, assumed by beta=2.5), "
            "'sigmoid' sums. 'sft' can be mixed in with loss_weights."
        },
    )
    cpo_gamma: float | None = field(
        default=None,
        metadata={"help": "CPO only. Margin strength (default 0.05). The DPO baseline runs at cpo_gamma=0."},
    )
    cpo_margin_type: str | None = field(
        default=None,
        metadata={
            "help": "CPO only. 'inverse_prob' (default; the paper's 1/pi_ref) or 'inverse_logp' (the released code's "
            "1/logp_ref numerics, for parity with the published numbers).",
            "choices": list(MARGIN_TYPES),
        },
    )
    cpo_max_margin: float | None = field(default=None, metadata={"help": "CPO only. Cap on the margin (default 10)."})
    cpo_auto_gamma: float | None = field(
        default=None,
        metadata={
            "help": "CPO only. If set (e.g. 0.9), choose cpo_gamma from the train set at the precompute as the "
            "smallest value giving this share of the misaligned pairs a non-negative target (overrides cpo_gamma)."
        },
    )
    ecpoc_gamma: float | None = field(
        default=None, metadata={"help": "E-CPOC only. Floor of the target log-odds (default 0.5)."}
    )
    ecpoc_tau: float | None = field(
        default=None, metadata={"help": "E-CPOC only. Smooth-max sharpness (default 2.0)."}
    )
    ecpoc_alpha: float | None = field(
        default=None, metadata={"help": "E-CPOC only. Correction scale 1/ecpoc_alpha (default 1)."}
    )
    reference_logps_file: str | None = field(
        default=None,
        metadata={
            "help": "Train-set reference log-probs written by `trl-cpo audit --config <this YAML>`: read instead of "
            "running the reference again when their fingerprint matches (all three methods)."
        },
    )

    def __post_init__(self):
        # Raw container: validation and TrainingArguments' post-processing happen in the real config class.
        pass


@dataclass
class DPOBaselineConfig(CPOConfig):
    """`CPOConfig` pinned to `cpo_gamma=0`: DPO's loss, run by the CPO trainer for a like-for-like baseline."""

    _method_name = "DPO-baseline"

    cpo_gamma: float = field(
        default=0.0,
        metadata={"help": "Always 0: at cpo_gamma=0 the CPO loss is exactly DPO's."},
    )

    def __post_init__(self):
        if self.cpo_gamma != 0:
            raise ValueError(f"The DPO baseline runs CPO at cpo_gamma=0; got cpo_gamma={self.cpo_gamma}.")
        # CPOConfig may choose cpo_gamma from the data (cpo_auto_gamma): never for the baseline.
        if getattr(self, "cpo_auto_gamma", None) is not None:
            raise ValueError("The DPO baseline runs CPO at cpo_gamma=0: unset cpo_auto_gamma.")
        super().__post_init__()


CONFIG_CLASSES = {**{name: method.config_class for name, method in METHOD_TABLE.items()}, "dpo": DPOBaselineConfig}


def to_trainer_config(raw: CPORecipeConfig, method: str) -> DPOConfig:
    """Build the trainer config of `method` from the parsed values (see `CPORecipeConfig`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {list(METHODS)}.")
    kwargs = {f.name: getattr(raw, f.name) for f in dataclasses.fields(DPOConfig) if f.init}
    kwargs["reference_logps_file"] = raw.reference_logps_file
    ignored = []
    for name in ALL_METHOD_FIELDS:
        value = getattr(raw, name)
        if value is None:
            continue
        if name in METHOD_FIELDS[method]:
            kwargs[name] = value
        elif not (method == "dpo" and name == "cpo_gamma" and value == 0):
            ignored.append(f"{name}={value!r}")
    if ignored:
        logger.warning("method=%s does not use %s; ignoring them.", method, ", ".join(ignored))
    return CONFIG_CLASSES[method](**kwargs)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser(
        (CPOScriptArguments, CPORecipeConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        description="Train with CPO, E-CPOC or the DPO baseline (--method) on TRL's DPOTrainer.",
        epilog="Every option can also be set in a YAML file passed as --config FILE.yaml (its keys are the option "
        "names without dashes); options given on the command line override the file.",
    )


def parse_args(argv: list[str] | None = None):
    """Parse `argv` (default: `sys.argv[1:]`, with `--config FILE.yaml`) into the four argument objects.

    The training arguments come back as the config class of `--method` (CPOConfig, ECPOCConfig or DPOBaselineConfig).
    """
    script_args, raw_training_args, model_args, dataset_args = make_parser().parse_args_and_config(argv)
    if script_args.hub_dry_run and not raw_training_args.push_to_hub:
        raise ValueError(
            "hub_dry_run=True shows what --push_to_hub would upload: set push_to_hub=True too (nothing is uploaded)."
        )
    return script_args, to_trainer_config(raw_training_args, script_args.method), model_args, dataset_args


# ----------------------------------------------------------------------------------------------------------------------
# DPO baseline
# ----------------------------------------------------------------------------------------------------------------------


class DPOBaselineTrainer(CPOTrainer):
    """DPO baseline for CPO / E-CPOC runs: the CPO trainer at `cpo_gamma=0`.

    Its loss is exactly DPO's, `-log sigmoid(beta * (delta_pi - delta_ref))`, in the log-prob space `loss_type` picks
    (`sigmoid_norm`: per-token averages, `sigmoid`: sums). It shares everything else with the CPO run (precomputed
    reference, data pipeline, metrics, including `u_fraction` and `ref_misaligned_fraction`), so the only difference
    between the two runs is the margin. `cpo_margin` is logged as 0.
    """

    # CPO's table entry with the baseline's config class (whose cpo_gamma is pinned to 0).
    method = dataclasses.replace(
        METHOD_TABLE["cpo"],
        name="dpo",
        title="DPO-baseline",
        config_class=DPOBaselineConfig,
        trainer_path=f"{__name__}:DPOBaselineTrainer",
        formula="loss = -log sigmoid(beta * (delta_pi - delta_ref)): DPO's loss (the CPO loss at cpo_gamma = 0)",
        config_only_fields=(),
    )
    _tag_names = ["trl", "dpo", "trl-cpo"]
    _name = "DPO baseline (of a CPO comparison)"
    _paper = _trl_compat.dpo_paper()

    @property
    def _card_description(self) -> str:  # read by trl_cpo.model_card
        space = "per-token averaged" if is_length_normalized(self.args.loss_type) else "summed"
        return (
            "DPO baseline for a comparison with CPO (Constrained Preference Optimization, "
            f"[arXiv:{PAPER_ID}](https://arxiv.org/abs/{PAPER_ID})), trained with trl-cpo's CPO trainer at "
            f"`cpo_gamma = 0`, whose loss is exactly DPO's, on {space} log-probs (loss_type {self.args.loss_type}), "
            "with reference log-probs precomputed once before training."
        )


TRAINERS = {**{name: method.trainer_class for name, method in METHOD_TABLE.items()}, "dpo": DPOBaselineTrainer}
#: Kept importable from here: the data loader moved to `trl_cpo.dataset_loading` (the audit uses it too).
__all__ = ["DPOBaselineConfig", "DPOBaselineTrainer", "drop_redundant_prompt", "load_preference_dataset", "main"]


def card_dataset_names(script_args: CPOScriptArguments, dataset_args: DatasetMixtureConfig) -> list[str]:
    """The training data as the model card names it: Hub ids are linked there, local paths only named."""
    if script_args.model_card_dataset_name:
        return [script_args.model_card_dataset_name]
    if dataset_args.datasets:
        return list(dict.fromkeys(d.path for d in dataset_args.datasets))
    return [script_args.dataset_name] if script_args.dataset_name else []


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def set_model_init_kwargs(training_args, model_args) -> None:
    """Model loading as in TRL's scripts: the trainer loads `model_name_or_path` with these kwargs (plus the
    quantization config, and device_map=None under multi-GPU / DeepSpeed); the config's own ones win."""
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs


def train(script_args, training_args, model_args, dataset_args):
    """Train as the arguments say, then save (or push, or dry-run the push); returns the trainer.

    The body of TRL's `trl/scripts/dpo.py`'s `main`, with the method's trainer, the reference report and a model card
    ready for the Hub.
    """
    from trl import get_peft_config, get_quantization_config

    set_model_init_kwargs(training_args, model_args)

    hub_dry_run = script_args.hub_dry_run and training_args.push_to_hub
    if hub_dry_run:
        # transformers' Trainer creates the Hub repo in __init__ and pushes at each save when push_to_hub is set: the
        # dry run builds and trains without it, and `write_hub_dry_run` restores it before the final save.
        training_args.push_to_hub = False

    # The main process downloads / prepares the data first; the other ranks then read it from the cache.
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_datasets(script_args, dataset_args)
        train_dataset = split(dataset, script_args.dataset_train_split, "training")
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = split(dataset, script_args.dataset_test_split, "evaluation")

    trainer = TRAINERS[script_args.method](
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    # What the model card says (also on the cards written at each checkpoint).
    trainer.model_card_kwargs.update(
        dataset_name=card_dataset_names(script_args, dataset_args),
        base_model_id=script_args.base_model_id,
        license=script_args.model_card_license,
    )

    if script_args.ignore_bias_buffers:
        import torch

        # DDP cannot broadcast boolean buffers (e.g. causal masks of some architectures).
        _trl_compat.ignore_in_ddp(
            trainer.model, [name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool]
        )

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(train_dataset)
    metrics["num_processes"] = trainer.accelerator.num_processes
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if hub_dry_run:
        folder = write_hub_dry_run(trainer)
        trainer.accelerator.print(f"Hub dry run: the files a push would upload are in {folder}; nothing uploaded.")
    elif training_args.push_to_hub:
        # Saves the model (the adapter alone under PEFT), writes the card, and uploads once.
        trainer.push_to_hub()
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")
    else:
        trainer.save_model(training_args.output_dir)
        model_name = (training_args.hub_model_id or os.path.normpath(training_args.output_dir)).split("/")[-1]
        trainer.create_model_card(model_name=model_name)
        trainer.accelerator.print(f"Saved to {training_args.output_dir}")

    trainer.end()  # finish the trackers and destroy the process group
    return trainer


def main(argv: list[str] | None = None) -> int:
    """`trl-cpo train`: parse `argv` (default `sys.argv[1:]`; `--config FILE.yaml` works) and train."""
    train(*parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
