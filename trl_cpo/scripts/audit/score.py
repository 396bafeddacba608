"""Scoring: the method's trainer, built exactly as the train script builds it, runs the train-set precompute.

Constructing `CPOTrainer` / `ECPOCTrainer` loads the model and tokenizer (`model_init_kwargs`, quantization and PEFT
from `ModelConfig`, as in training), tokenizes and truncates the train split with TRL's own code, and runs the
trainers' precompute (`trl_cpo.reference.compute_reference_logps`). The audit reads the result from the trainer, so
its per-pair log-probs are the ones a training run on the same inputs computes, to the last digit.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl_cpo._trl_compat import TOKENIZED_COLUMNS
from trl_cpo.fingerprint import ReferenceFingerprint, reference_fingerprint
from trl_cpo.pair_checks import PreferenceDataError
from trl_cpo.reference import ReferenceLogps
from trl_cpo.scripts import train as train_script

from .args import AuditError, AuditSettings
from .data import _first_line

#: Column added to the train split to map scored pairs back to input rows (TRL drops pairs whose prompt fills
#: `max_length`); the precompute and the fingerprint ignore it.
ROW_COLUMN = "audit_row"


@dataclass
class Scored:
    """What the precompute gave, per scored pair, in dataset order."""

    reference: ReferenceLogps
    #: Input row of each scored pair.
    rows: list[int]
    num_input: int
    #: Pairs whose prompt + longer completion exceeds `max_length` (truncated by the collator).
    num_truncated: int
    #: The config the trainer ran with (after any `cpo_auto_gamma` choice).
    config: object
    fingerprint: ReferenceFingerprint
    num_processes: int
    is_main_process: bool


def build_trainer(settings: AuditSettings, dataset):
    """Construct `--method`'s trainer with the train script's own `build_trainer` (same `model_init_kwargs`,
    quantization and PEFT config); this loads the model and runs the precompute."""
    return train_script.build_trainer(settings.method.name, settings.trainer_config, settings.model, dataset)


def _check_chat_template(settings: AuditSettings, dataset) -> None:
    """Conversational data needs a chat template: say so before the model loads (TRL would fail while tokenizing)."""
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational

    if not is_conversational(dataset[0]):
        return
    path = settings.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=settings.model.model_revision)
    except (OSError, ValueError) as error:
        raise AuditError(
            f"--model_name_or_path {path}: could not load its tokenizer ({_first_line(error)})."
        ) from None
    if tokenizer.chat_template is None:
        raise AuditError(
            f"--dataset_name {settings.script.dataset_name} is conversational but the tokenizer of "
            f"--model_name_or_path {path} has no chat template. Use the model's chat tokenizer, or plain-text data."
        )


def score(settings: AuditSettings, dataset) -> Scored:
    """Run the precompute on `dataset` (the train split) through the trainer; return the per-pair results."""
    _check_chat_template(settings, dataset)
    try:
        trainer = build_trainer(settings, dataset.add_column(ROW_COLUMN, list(range(len(dataset)))))
    except OSError as error:
        raise AuditError(
            f"--model_name_or_path {settings.model.model_name_or_path}: could not load the model or its tokenizer "
            f"({_first_line(error)})."
        ) from None
    except PreferenceDataError as error:  # what the trainer refuses once the pairs are tokenized
        raise AuditError(str(error)) from None
    prepared = trainer.train_dataset
    max_length = trainer.args.max_length
    truncated = 0
    if max_length is not None:
        truncated = sum(
            len(p) + max(len(c), len(r)) > max_length
            for p, c, r in zip(*(prepared[column] for column in TOKENIZED_COLUMNS))
        )
    return Scored(
        reference=trainer.train_reference_logps,
        rows=list(prepared[ROW_COLUMN]),
        num_input=len(dataset),
        num_truncated=truncated,
        config=trainer.args,
        fingerprint=reference_fingerprint(trainer, prepared),
        num_processes=trainer.accelerator.num_processes,
        is_main_process=trainer.accelerator.is_main_process,
    )
