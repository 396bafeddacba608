# Copyright the trl-cpo authors. Licensed under the Apache License, Version 2.0.
"""
`trl-cpo train`: train with CPO or E-CPOC (Constrained Preference Optimization, arXiv:2605.20834), or the matching DPO
baseline.

Not TRL's Contrastive Preference Optimization (`trl.experimental.cpo`): same acronym, different algorithm.

Shaped like TRL's `trl/scripts/dpo.py`: one `TrlParser` over script, training, model and dataset-mixture arguments;
`--config FILE.yaml` sets defaults and any command-line flag overrides them. `--method` (any key of
`trl_cpo.methods.METHODS`) picks the training arguments' class and the trainer, so one config gives CPO, E-CPOC and the
DPO baseline on identical settings:

- `cpo`   -> `trl_cpo.CPOTrainer` with a `CPOConfig`     (`--cpo_gamma`, `--cpo_margin_type`, `--cpo_max_margin`,
             `--cpo_auto_gamma`)
- `ecpoc` -> `trl_cpo.ECPOCTrainer` with an `ECPOCConfig` (`--ecpoc_gamma`, `--ecpoc_tau`, `--ecpoc_alpha`)
- `dpo`   -> the CPO trainer at `cpo_gamma=0` (`DPOBaselineTrainer`, `DPOBaselineConfig`), which is exactly DPO's loss
             with the same `--beta`, the same `--loss_type` log-prob space and the same reference, and logs the same
             U-space diagnostics.
- `hypo`  -> HyPO (Yuan et al., ICLR 2026, arXiv:2602.11902; the released CPO code's default `clip` variant): the E-CPOC
             trainer at `ecpoc_gamma=0, ecpoc_tau=inf, ecpoc_alpha=1` (`HyPOTrainer`, `HyPOConfig`), target
             `max(delta_ref, 0)`.

Settings of a method other than `--method`'s are ignored (with a warning), so one config can carry both methods'
settings (`trl_cpo.scripts._method_args`).

    trl-cpo train --config recipes/configs/tiny_cpu.yaml                      # one process
    accelerate launch -m trl_cpo.scripts.train --config FILE.yaml             # several processes / GPUs
    accelerate launch recipes/cpo_llama3.py --config FILE.yaml                # the same, through the recipe

`--resume_from_checkpoint true` (or `last`) resumes from the newest complete checkpoint of `output_dir`; any other
value is a checkpoint folder. Both, and an `output_dir` that cannot be written, are checked before anything loads.

`--dataset_name` takes a Hub dataset, a local JSON / JSON-lines / Parquet / CSV file, or a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`trl_cpo.dataset_loading`). `--push_to_hub --hub_dry_run true`
writes the folder and card a push would upload into `OUTPUT_DIR/_hub_dry_run/`, offline, and uploads nothing. See
recipes/README.md for the setups.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from trl_cpo._trl_compat import ignore_in_ddp
from trl_cpo.dataset_loading import drop_redundant_prompt, load_datasets, load_preference_dataset, split
from trl_cpo.methods import METHODS as METHOD_TABLE
from trl_cpo.methods import DPOBaselineConfig, Method
from trl_cpo.model_card import write_hub_dry_run
from trl_cpo.trainers import TRAINERS, DPOBaselineTrainer

from . import _method_args

__all__ = [
    "CPOScriptArguments",
    "DPOBaselineConfig",
    "DPOBaselineTrainer",
    "drop_redundant_prompt",
    "load_preference_dataset",
    "main",
    "make_parser",
    "parse_args",
    "train",
]

logger = logging.getLogger(__name__)

#: `--method`'s choices, and the script's view of each entry: its config class, the flags it adds (its trainer:
#: `TRAINERS`, from `trl_cpo.trainers`).
METHODS = tuple(METHOD_TABLE)
CONFIG_CLASSES = {name: method.config_class for name, method in METHOD_TABLE.items()}
METHOD_FIELDS = {name: method.flags for name, method in METHOD_TABLE.items()}


@dataclass
class CPOScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus the method choice, what the model card says, and the Hub dry run."""

    method: str = field(
        default="cpo",
        metadata={
            "help": "Which objective to train (an entry of trl_cpo.methods.METHODS): "
            + ", ".join(
                f"'{name}' ({method.title}{f': {method.base.title} with its settings pinned' if method.base else ''})"
                for name, method in METHOD_TABLE.items()
            )
            + ". `--method M --help` lists the options of M's training config.",
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


def make_parser(method: Method | str = CPOScriptArguments.method, other_settings=None, prog: str | None = None):
    """The script's `TrlParser` for `method`: its training arguments are `method`'s config class; `other_settings`
    (default: `_method_args.other_settings_types`) add the other methods' settings as ignored argument groups."""
    method = METHOD_TABLE[method] if isinstance(method, str) else method
    if other_settings is None:
        other_settings = _method_args.other_settings_types(method.name)
    return TrlParser(
        (CPOScriptArguments, method.config_class, ModelConfig, DatasetMixtureConfig, *other_settings),
        prog=prog,
        description="Train with CPO, E-CPOC, HyPO or the DPO baseline (--method) on TRL's DPOTrainer.",
        epilog="Every option can also be set in a YAML file passed as --config FILE.yaml (its keys are the option "
        "names without dashes); options given on the command line override the file.",
    )


def parse_args(argv: list[str] | None = None):
    """Parse `argv` (default: `sys.argv[1:]`, with `--config FILE.yaml`) into the four argument objects.

    The training arguments come back as the config class of `--method` (CPOConfig, ECPOCConfig or DPOBaselineConfig).
    """
    method, parsed, ignored = _method_args.parse(make_parser, argv, default=CPOScriptArguments.method)
    if ignored:
        logger.warning(ignored)
    script_args, training_args, model_args, dataset_args = parsed
    if script_args.hub_dry_run and not training_args.push_to_hub:
        raise ValueError(
            "hub_dry_run=True shows what --push_to_hub would upload: set push_to_hub=True too (nothing is uploaded)."
        )
    training_args.resume_from_checkpoint = resume_target(training_args.resume_from_checkpoint)
    return script_args, training_args, model_args, dataset_args


#: `--resume_from_checkpoint` words (any case) for the newest complete checkpoint of output_dir, and for no resume.
RESUME_NEWEST, RESUME_NONE = ("true", "last"), ("false", "none", "")


def resume_target(value):
    """`resume_from_checkpoint` as `trainer.train` takes it: True for 'true' / 'last' (the trainers resolve True to
    the newest complete checkpoint), None for 'false' / 'none', else the checkpoint path as given."""
    if value is None or isinstance(value, bool):
        return value or None
    word = str(value).strip().lower()
    return True if word in RESUME_NEWEST else None if word in RESUME_NONE else value


def check_outputs_and_resume(training_args) -> None:
    """Before any data or model loads: an output_dir that can be written, and a checkpoint to resume from."""
    from trl_cpo._config_utils import ensure_writable_output_dir
    from trl_cpo.checkpoints import complete_checkpoint_problem, last_complete_checkpoint

    ensure_writable_output_dir(training_args)
    resume = training_args.resume_from_checkpoint
    if resume is True:
        last_complete_checkpoint(training_args.output_dir)  # raises when there is none
    elif resume is not None and complete_checkpoint_problem(resume) is not None:
        raise ValueError(
            f"resume_from_checkpoint={resume!r} cannot be resumed from: {complete_checkpoint_problem(resume)}. Pass a "
            f"complete checkpoint folder (e.g. {os.path.join(training_args.output_dir, 'checkpoint-500')}), or "
            "--resume_from_checkpoint true (or last) for the newest complete checkpoint of output_dir."
        )


def card_dataset_names(script_args: CPOScriptArguments, dataset_args: DatasetMixtureConfig) -> list[str]:
    """The training data as the model card names it: Hub ids are linked there, local paths only named."""
    if script_args.model_card_dataset_name:
        return [script_args.model_card_dataset_name]
    if dataset_args.datasets:
        return list(dict.fromkeys(d.path for d in dataset_args.datasets))
    return [script_args.dataset_name] if script_args.dataset_name else []


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


def build_trainer(method: str, training_args, model_args, train_dataset, eval_dataset=None):
    """`method`'s trainer on `model_name_or_path`, as TRL's scripts build theirs (model kwargs, quantization, PEFT)."""
    from trl import get_peft_config, get_quantization_config

    set_model_init_kwargs(training_args, model_args)
    return TRAINERS[method](
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )


def train(script_args, training_args, model_args, dataset_args):
    """Train as the arguments say, then save (or push, or dry-run the push); returns the trainer.

    The body of TRL's `trl/scripts/dpo.py`'s `main`, with the method's trainer, the reference report and a model card
    ready for the Hub.
    """
    check_outputs_and_resume(training_args)
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

    trainer = build_trainer(script_args.method, training_args, model_args, train_dataset, eval_dataset)
    # What the model card says (also on the cards written at each checkpoint).
    trainer.model_card_kwargs.update(
        dataset_name=card_dataset_names(script_args, dataset_args),
        base_model_id=script_args.base_model_id,
        license=script_args.model_card_license,
    )

    if script_args.ignore_bias_buffers:
        import torch

        # DDP cannot broadcast boolean buffers (e.g. causal masks of some architectures).
        ignore_in_ddp(
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
