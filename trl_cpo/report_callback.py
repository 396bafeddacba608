"""Callbacks that put the reference report (`trl_cpo.report`) into a run's logs.

- CPOTrainer / ECPOCTrainer put the report they computed on their first training log entry (`trainer.log`), so W&B /
  TensorBoard / the log history / the model card get it; `announce_report` prints it when it is computed.
- `ReferenceReportCallback` (public): gives a plain `trl.DPOTrainer` run the same report at train start, under the same
  keys, reported as what CPO at its default settings would change on that data.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from . import _trl_compat
from .reference import compute_reference_logps
from .report import ReferenceReport, reference_report

logger = logging.getLogger(__name__)

#: The key whose presence in the log history says the report was logged already (a resumed run keeps its history).
REPORT_MARKER = "reference/misaligned_fraction"


def announce_report(trainer, report: ReferenceReport) -> None:
    """Print the report's table on the main process and raise its warnings (every rank computes the same report)."""
    if trainer.accelerator.is_main_process:
        print(report.format_table(), flush=True)
        for message in report.warnings:
            logger.warning(message)


def log_report_once(trainer, report: ReferenceReport, state) -> None:
    if any(REPORT_MARKER in entry for entry in state.log_history):
        return
    trainer.log(report.to_logs())


class ReferenceReportCallback(TrainerCallback):
    """Log the reference report at the start of a plain `trl.DPOTrainer` run.

    `trainer.add_callback(ReferenceReportCallback(trainer))`. At train start it runs the reference once over the train
    set (`trl_cpo.compute_reference_logps`, the trainers' own precompute), computes `trl_cpo.report.reference_report`
    for CPO at its default settings with the trainer's `beta` and `loss_type`, prints its table, logs it under the
    `reference/` keys CPOTrainer uses, and keeps it as `callback.report`. The extra reference pass costs about one
    epoch's forward passes without gradients.
    """

    def __init__(self, trainer, batch_size: int | None = None):
        self._trainer = trainer
        self._batch_size = batch_size
        self.report: ReferenceReport | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer
        if self.report is None:
            batch_size = self._batch_size or args.precompute_ref_batch_size or args.per_device_train_batch_size
            dataset = trainer.train_dataset
            stale = [c for c in _trl_compat.REFERENCE_COLUMNS if c in dataset.column_names]
            reference = compute_reference_logps(
                trainer, dataset.remove_columns(stale) if stale else dataset, batch_size=batch_size
            )
            self.report = reference_report(
                reference.chosen, reference.rejected, reference.chosen_lengths, reference.rejected_lengths, args
            )
            announce_report(trainer, self.report)
        log_report_once(trainer, self.report, state)
