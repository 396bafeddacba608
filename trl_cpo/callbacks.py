"""`UFractionCallback`: watch a DPO run for the undesirable solution space U at every evaluation, without changing trainers.

DPO can lower its loss on a pair while the policy still prefers the rejected response, whenever the reference does too
(``delta_ref < delta_pi < 0``, the space U of arXiv:2605.20834, Def. 3.3). This callback measures, at each evaluation
and on each eval set, the share of pairs in U and the share the reference gets wrong, with the trainer's own collator,
reference handling (``ref_model``, PEFT adapter or precomputed reference log-probs) and processes (results are
gathered over ranks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from . import _trl_compat
from .logps import completion_lengths, is_length_normalized, to_loss_space
from .metrics import U_FRACTION_ATOL, ref_misaligned_fraction, u_fraction

if TYPE_CHECKING:
    from trl import DPOTrainer

_PER_PAIR_NAMES = (
    "policy_chosen",
    "policy_rejected",
    "ref_chosen",
    "ref_rejected",
    "chosen_lengths",
    "rejected_lengths",
)


class UFractionCallback(TrainerCallback):
    r"""Log ``u_fraction`` and ``ref_misaligned_fraction`` of the eval set at each evaluation of a DPO-style trainer.

    Works with a plain ``trl.DPOTrainer`` and with ``CPOTrainer`` / ``ECPOCTrainer``:

        trainer = DPOTrainer(model, args=DPOConfig(..., eval_strategy="steps"), train_dataset=..., eval_dataset=...)
        trainer.add_callback(UFractionCallback(trainer))

    After each evaluation of an eval set it runs the current policy over that set (the same batches the evaluation
    used), reads the reference log-probs the way the trainer does (precomputed columns, ``ref_model``, or the policy
    with its PEFT adapter disabled), gathers the per-pair results over all processes and computes

        u_fraction              = mean(delta_ref + 1e-4 < delta_pi < 0)   (metrics.U_FRACTION_ATOL: round-off)
        ref_misaligned_fraction = mean(delta_ref < 0)

    with ``delta = logp(y_w) - logp(y_l)`` in the log-prob space of the trainer's loss: per-token averages if its
    ``args.loss_type`` contains ``"sigmoid_norm"``, sums otherwise (``trl_cpo.logps.is_length_normalized``). The
    values are logged with the evaluation's prefix (``eval_u_fraction``, ``eval_ref_misaligned_fraction``;
    ``eval_<name>_...`` for a dict of eval sets) through ``trainer.log``, so they reach ``trainer.state.log_history``
    (as a record right after the evaluation's own, at the same step) and every reporter (TensorBoard, W&B, ...). They
    are also added to the metrics dict that ``evaluate`` returns, so ``metric_for_best_model="eval_u_fraction"`` works
    and callbacks added after this one see them.

    Args:
        trainer: the ``trl.DPOTrainer`` (or subclass) to watch.

    Under ``torchrun`` (several processes), end the script with ``trl_cpo.end_training(trainer)`` on every process:
    it gives any Trainer the clean end ``CPOTrainer.end()`` has, without which a gloo run can abort at exit.

    Cost: one extra no-grad forward of the policy over the eval set per evaluation (DPOTrainer's evaluation does not
    expose its per-pair log-probs), plus one of the reference when the trainer does not precompute it.
    ``CPOTrainer`` / ``ECPOCTrainer`` already log ``eval_u_fraction`` from their own evaluation forward (a mean of
    per-batch values); add this callback to them only to get whole-eval-set values, at the cost above.
    LD-DPO weighting (``ld_alpha``) is not supported: U is measured on plain summed or averaged log-probs.
    """

    def __init__(self, trainer: DPOTrainer):
        if trainer.args.ld_alpha is not None:
            raise ValueError(
                "UFractionCallback does not support ld_alpha (LD-DPO weighting): it measures U on plain summed or "
                "per-token log-probs. Unset ld_alpha, or do not add this callback."
            )
        self.trainer = trainer

    @property
    def length_normalized(self) -> bool:
        """Whether U is measured on per-token averaged log-probs: follows the trainer's `args.loss_type`."""
        return is_length_normalized(self.trainer.args.loss_type)

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        if eval_dataloader is None or metrics is None:
            return
        prefix = _trl_compat.metric_prefix(metrics)
        values = {f"{prefix}_{name}": value for name, value in self.compute(eval_dataloader).items()}
        metrics.update(values)
        self.trainer.log(dict(values))

    @torch.no_grad()
    def per_pair_logps(self, dataloader) -> dict[str, torch.Tensor]:
        """Per-pair policy and reference log-probs (summed) and completion lengths over `dataloader`, on every rank.

        `dataloader` yields the trainer's preference batches (e.g. `trainer.get_eval_dataloader()`); results are
        gathered over processes, one row per pair.
        """
        trainer = self.trainer
        policy = trainer.model
        reference = trainer.ref_model or trainer.model
        was_training = policy.training
        policy.eval()
        try:
            parts = [self._batch_logps(policy, reference, batch) for batch in dataloader]
        finally:
            policy.train(was_training)
        return {name: torch.cat(column) for name, column in zip(_PER_PAIR_NAMES, zip(*parts))}

    def _batch_logps(self, policy, reference, batch) -> list[torch.Tensor]:
        trainer = self.trainer
        batch = _trl_compat.prepare_inputs(trainer, batch)
        policy_chosen, policy_rejected = self._policy_logps(policy, batch)
        if _trl_compat.REF_CHOSEN_LOGPS in batch:
            ref_chosen, ref_rejected = (batch[key] for key in _trl_compat.REFERENCE_COLUMNS)
        else:
            ref_chosen, ref_rejected = _trl_compat.reference_logps(trainer, reference, batch)
        per_pair = (
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            *completion_lengths(batch[_trl_compat.COMPLETION_MASK]),
        )
        gathered = trainer.accelerator.gather_for_metrics(tuple(t.float() for t in per_pair))
        return [t.cpu() for t in gathered]

    def compute(self, dataloader) -> dict[str, float]:
        """`u_fraction` and `ref_misaligned_fraction` over `dataloader`, in this callback's log-prob space."""
        logps = self.per_pair_logps(dataloader)
        lengths = (logps["chosen_lengths"], logps["rejected_lengths"], self.length_normalized)
        space = [
            *to_loss_space(logps["policy_chosen"], logps["policy_rejected"], *lengths),
            *to_loss_space(logps["ref_chosen"], logps["ref_rejected"], *lengths),
        ]
        return {
            "u_fraction": u_fraction(*space, atol=U_FRACTION_ATOL).item(),
            "ref_misaligned_fraction": ref_misaligned_fraction(*space[2:]).item(),
        }

    def _policy_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # The policy's summed completion log-probs, computed as DPOTrainer computes them (fused LM head, completion
        # tokens only), but without a loss.
        trainer = self.trainer
        with (
            _trl_compat.disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs),
            trainer.accelerator.autocast(),
        ):
            log_probs = _trl_compat.fused_forward_log_probs(model, batch)
        return _trl_compat.summed_completion_logps(log_probs, batch[_trl_compat.COMPLETION_MASK])
