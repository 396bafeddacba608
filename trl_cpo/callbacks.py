"""`DiagnosticsCallback`: the DPO diagnostics of `trl_cpo.diagnostics` for any DPO-style trainer, and per-pair files.

DPO can lower its loss on a pair while the policy still prefers the rejected response, whenever the reference does too
(``delta_ref < delta_pi < 0``, the space U of arXiv:2605.20834, Def. 3.3). DPOTrainer's ``rewards/accuracies`` counts
such a pair as right. The callback adds what shows it, with the trainer's own collator, reference handling
(``ref_model``, PEFT adapter or precomputed reference log-probs) and processes (results are gathered over ranks):
ranking accuracy, likelihood displacement, gradient saturation and the U-fraction at every step, and one file of
per-pair evidence per split (keyed by the dataset row) at the end of training.

`UFractionCallback`, the earlier eval-only callback, is kept as a deprecated alias of its behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from . import _trl_compat, diagnostics
from .logps import completion_lengths, is_length_normalized, to_loss_space
from .metrics import U_FRACTION_ATOL, ref_misaligned_fraction, u_fraction

if TYPE_CHECKING:
    from trl import DPOTrainer

logger = logging.getLogger(__name__)

_PER_PAIR_NAMES = (
    "policy_chosen",
    "policy_rejected",
    "ref_chosen",
    "ref_rejected",
    "chosen_lengths",
    "rejected_lengths",
)
#: `pairs` settings: no file, files at the end of training, or also at every evaluation (eval sets).
PAIR_MODES = ("no", "end", "eval")
#: DPOTrainer loss types whose logit is ``beta * (delta_pi - delta_ref)`` (`saturated_fraction` needs one).
_LOGISTIC_LOSSES = ("sigmoid", "sigmoid_norm")


def _reshard_fsdp2(model: torch.nn.Module) -> None:
    """Return every FSDP2 (``fully_shard``) module of `model` to the sharded state a training step leaves it in.

    FSDP2 keeps some groups unsharded after forward, expecting backward to need them at once: the root's (PyTorch's
    default) and the final norm + LM head (accelerate shards them with ``reshard_after_forward=False``). A no-grad pass
    has no backward, so they stay unsharded: full plain tensors registered in place of the DTensor shards the optimizer
    holds. FSDP2's state-dict hooks reshard them, so saving the model works, but torch.distributed.checkpoint's
    ``get_optimizer_state_dict`` maps the optimizer's parameters through ``named_parameters()`` first and fails
    (KeyError), and each rank keeps a full LM head in memory. ``FSDPModule.reshard`` is public but not recursive, hence
    every module. Not an FSDP2 model (one process, DDP, FSDP1, DeepSpeed): nothing to do.
    """
    if not torch.distributed.is_available():  # a torch build without torch.distributed has no FSDP to import
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class _FusedHeadCalls:
    """The fused-LM-head per-token log-probs of every forward of `module` made while `active` (a forward hook, like
    `trl_cpo.logps.PolicyLogpsRecorder`): the policy's forward in DPOTrainer's loss, then, for a PEFT policy without a
    ref_model, its live reference forward with the adapter disabled."""

    def __init__(self, module: torch.nn.Module):
        self.active, self.calls = False, []
        module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        log_probs = _trl_compat.fused_head_log_probs(kwargs, output) if self.active else None
        if log_probs is not None:
            self.calls.append(log_probs.detach())


class DiagnosticsCallback(TrainerCallback):
    r"""The DPO diagnostics no trainer logs, for a plain ``trl.DPOTrainer``, and per-pair files for any DPO trainer.

        trainer = DPOTrainer(model, args=DPOConfig(...), train_dataset=..., eval_dataset=...)
        trainer.add_callback(DiagnosticsCallback(trainer))

    **At every step** (training and evaluation), from the tensors the loss step already has (no extra forward: the
    policy's log-probs are read from its own forward by a hook, the reference's from the batch or from DPOTrainer's
    live reference forward), gathered over processes like DPOTrainer's ``rewards/*``, and logged with them:
    ``u_fraction``, ``ref_misaligned_fraction``, ``ranking_accuracy``, ``ref_ranking_accuracy``,
    ``likelihood_displacement``, ``both_fell`` and ``saturated_fraction`` (``eval_...`` in evaluation), each defined in
    `trl_cpo.metrics` and computed in the log-prob space of the loss: per-token averages if ``args.loss_type``
    contains ``"sigmoid_norm"``, sums otherwise. ``saturated_fraction`` needs a logistic loss (``"sigmoid"`` or
    ``"sigmoid_norm"``, ``f_divergence_type="reverse_kl"``) and is left out otherwise. ``CPOTrainer`` and
    ``ECPOCTrainer`` log these themselves: there the callback only writes files (and they write them without it,
    as their config's ``pair_diagnostics`` says).

    **Per-pair files** (``pairs``): ``"end"`` (default) writes, at the end of training, one JSON-lines file per split
    (``train``, ``eval`` or ``eval_<name>``) to ``<output_dir>/_diagnostics/<split>.jsonl``, one line per pair with the
    columns of `trl_cpo.diagnostics.PAIR_COLUMNS` (the audit's ``pairs.jsonl`` has the same), keyed by ``row``, the
    pair's row in the dataset given to the trainer. ``"eval"`` also writes each eval split at every evaluation, to
    ``_diagnostics/step-<N>/``; ``"no"`` writes nothing. Each file costs one no-grad forward of the policy over the
    split (plus the reference's when it is live). With a plain DPOTrainer, ``row`` is the position in TRL's prepared
    dataset: the input row, unless TRL dropped pairs whose prompt fills ``max_length`` (CPOTrainer maps it back).

    Args:
        trainer: the ``trl.DPOTrainer`` (or subclass) to watch.
        pairs: ``"end"``, ``"eval"`` or ``"no"`` (above).
        log_steps: log the per-step metrics (no effect on CPOTrainer / ECPOCTrainer, which log them anyway).

    Under ``torchrun``, end the script with ``trl_cpo.end_training(trainer)`` on every process. LD-DPO weighting
    (``ld_alpha``) is not supported.
    """

    def __init__(self, trainer: DPOTrainer, *, pairs: str = "end", log_steps: bool = True):
        if trainer.args.ld_alpha is not None:
            raise ValueError(
                f"{type(self).__name__} does not support ld_alpha (LD-DPO weighting): it measures U on plain summed "
                "or per-token log-probs. Unset ld_alpha, or do not add this callback."
            )
        if pairs not in PAIR_MODES:
            raise ValueError(
                f"pair_diagnostics={pairs!r} is invalid: use 'end' (per-pair files at the end of training), 'eval' "
                "(also at every evaluation) or 'no'."
            )
        self.trainer, self.pairs = trainer, pairs
        #: Whole-split diagnostics (`trl_cpo.diagnostics.summary`) of each file written at the end of training.
        self.final: dict[str, dict[str, float]] = {}
        if log_steps and not hasattr(trainer, "method"):  # the trl_cpo trainers log them from their own step
            self._install_step_metrics()

    @property
    def length_normalized(self) -> bool:
        """Whether U is measured on per-token averaged log-probs: follows the trainer's `args.loss_type`."""
        return is_length_normalized(self.trainer.args.loss_type)

    @property
    def logistic(self) -> bool:
        """Whether the loss is DPO's logistic one, whose per-pair gradient weight is ``sigmoid(-z)``."""
        args = self.trainer.args
        loss_type = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        return any(lt in _LOGISTIC_LOSSES for lt in loss_type) and args.f_divergence_type == "reverse_kl"

    # -- every step: read from the loss's own forwards ------------------------------------------------------------------

    def _install_step_metrics(self) -> None:
        trainer = self.trainer
        self._recorders = [_FusedHeadCalls(trainer.model)]
        if trainer.ref_model is not None:
            self._recorders.append(_FusedHeadCalls(trainer.ref_model))
        compute_loss = trainer.compute_loss  # the Trainer calls `self.compute_loss` once per micro-batch

        def compute_loss_with_diagnostics(model, inputs, return_outputs=False, num_items_in_batch=None):
            with self._recording():
                result = compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            self._log_step(inputs)
            return result

        trainer.compute_loss = compute_loss_with_diagnostics

    @contextlib.contextmanager
    def _recording(self):
        for recorder in self._recorders:
            recorder.active, recorder.calls = True, []
        try:
            yield
        finally:
            for recorder in self._recorders:
                recorder.active = False

    @torch.no_grad()
    def _log_step(self, inputs: dict) -> None:
        policy_calls = self._recorders[0].calls
        ref_calls = self._recorders[1].calls if len(self._recorders) > 1 else policy_calls[1:]
        mask = inputs[_trl_compat.COMPLETION_MASK]
        if _trl_compat.REF_CHOSEN_LOGPS in inputs:
            reference = tuple(inputs[key] for key in _trl_compat.REFERENCE_COLUMNS)
        elif ref_calls:
            reference = _trl_compat.summed_completion_logps(ref_calls[0], mask)
        else:
            reference = None
        if not policy_calls or reference is None:
            return
        policy = _trl_compat.summed_completion_logps(policy_calls[0], mask)
        per_pair = tuple(t.float() for t in (*policy, *reference, *completion_lengths(mask)))
        mode = _trl_compat.metrics_mode(self.trainer)
        # As DPOTrainer gathers its rewards in training, and without the samples even_batches repeated in evaluation.
        accelerator = self.trainer.accelerator
        gathered = (accelerator.gather if mode == "train" else accelerator.gather_for_metrics)(per_pair)
        lengths = (*gathered[4:], self.length_normalized)
        space = (*to_loss_space(*gathered[:2], *lengths), *to_loss_space(*gathered[2:4], *lengths))
        logits = self.trainer.args.beta * ((space[0] - space[1]) - (space[2] - space[3])) if self.logistic else None
        metrics = _trl_compat.metric_lists(self.trainer, mode)
        for name, value in diagnostics.step_metrics(*space, logits).items():
            metrics[name].append(value)

    # -- per-pair files ----------------------------------------------------------------------------------------------

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.pairs != "eval" or metrics is None:
            return
        split = _trl_compat.metric_prefix(metrics)
        dataset = self._splits().get(split)
        if dataset is None:  # a dataset passed to evaluate(): not one of the trainer's splits, no rows to key by
            logger.info("No per-pair file for %s: it is not one of the trainer's eval sets.", split)
            return
        self.write_split(split, dataset, folder=f"step-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.pairs == "no":
            return
        for split, dataset in self._splits(train=True).items():
            self.final[split] = diagnostics.summary(self.write_split(split, dataset))

    def _splits(self, train: bool = False) -> dict:
        """The trainer's map-style splits by file name: `train` (if `train`), `eval` or `eval_<name>`."""
        from datasets import Dataset

        trainer = self.trainer
        splits = {"train": trainer.train_dataset} if train else {}
        if isinstance(trainer.eval_dataset, dict):
            splits.update({f"eval_{name}": dataset for name, dataset in trainer.eval_dataset.items()})
        elif trainer.eval_dataset is not None:
            splits["eval"] = trainer.eval_dataset
        streamed = [split for split, dataset in splits.items() if not isinstance(dataset, Dataset)]
        for split in streamed:  # streamed data: no rows to key by, and possibly no end
            logger.info("No per-pair file for %s: it is not a map-style datasets.Dataset.", split)
        return {split: dataset for split, dataset in splits.items() if split not in streamed}

    def pairs_path(self, split: str, folder: str = "") -> str:
        """Where the per-pair file of `split` goes: `<output_dir>/_diagnostics/[<folder>/]<split>.jsonl`."""
        return os.path.join(self.trainer.args.output_dir, diagnostics.PAIRS_DIR, folder, f"{split}.jsonl")

    def write_split(self, split: str, dataset, folder: str = "") -> dict[str, list]:
        """Run the current policy over `dataset` (a prepared split of the trainer, in dataset order, on every rank),
        write `split`'s per-pair file on the main process, and return its columns."""
        trainer = self.trainer
        loader = DataLoader(
            dataset,
            batch_size=trainer.args.per_device_eval_batch_size,
            collate_fn=trainer.data_collator,
            num_workers=trainer.args.dataloader_num_workers,
            pin_memory=trainer.args.dataloader_pin_memory,
            shuffle=False,
        )
        columns = self.pair_columns(split, self.per_pair_logps(trainer.accelerator.prepare(loader)))
        if trainer.accelerator.is_main_process:
            diagnostics.write_pairs(self.pairs_path(split, folder), columns)
        return columns

    def pair_columns(self, split: str, logps: dict[str, torch.Tensor]) -> dict[str, list]:
        """The per-pair columns of `split` from `per_pair_logps`' output, with the method's target and input rows."""
        trainer, lengths = self.trainer, (logps["chosen_lengths"], logps["rejected_lengths"])
        reference = (logps["ref_chosen"], logps["ref_rejected"])
        if hasattr(trainer, "method"):  # CPO / E-CPOC: the target their loss uses
            from .reference import ReferenceLogps

            target = trainer.method.target_from_config(ReferenceLogps(*reference, *lengths), trainer.args)
        elif self.logistic:  # DPO: delta_ref
            chosen, rejected = to_loss_space(*reference, *lengths, self.length_normalized)
            target = chosen - rejected
        else:
            target = None
        return diagnostics.pair_columns(
            self._rows(split, len(lengths[0])),
            *reference,
            *lengths,
            length_normalized=self.length_normalized,
            target=target,
            beta=trainer.args.beta,
            policy_chosen=logps["policy_chosen"],
            policy_rejected=logps["policy_rejected"],
        )

    def _rows(self, split: str, num_pairs: int) -> list[int]:
        # The trl_cpo trainers record which input rows TRL's max_length filter dropped (`trl_cpo.data.LengthReport`).
        name = split if split in ("train", "eval") else split.removeprefix("eval_")
        report = getattr(self.trainer, "length_reports", {}).get(name)
        if report is not None:
            dropped = set(report.dropped_rows)
            kept = [row for row in range(report.num_pairs) if row not in dropped]
            if len(kept) == num_pairs:
                return kept
        return list(range(num_pairs))

    # -- the policy over a whole dataloader ----------------------------------------------------------------------------

    @torch.no_grad()
    def per_pair_logps(self, dataloader) -> dict[str, torch.Tensor]:
        """Per-pair policy and reference log-probs (summed) and completion lengths over `dataloader`, on every rank.

        `dataloader` yields the trainer's preference batches (e.g. `trainer.get_eval_dataloader()`); results are
        gathered over processes, one row per pair, in dataset order.
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
            for model in (policy, reference):  # the same model twice without a ref_model: resharding is idempotent
                _reshard_fsdp2(model)
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


class UFractionCallback(DiagnosticsCallback):
    r"""Deprecated: use `DiagnosticsCallback`, which logs ``u_fraction`` with the other diagnostics at every step, from
    the loss's own forward. Kept, with its behaviour, for existing scripts.

    After each evaluation of an eval set it runs the current policy over that set once more (the same batches),
    gathers the per-pair results over all processes and logs, for the whole set,

        u_fraction              = mean(delta_ref + 1e-4 < delta_pi < 0)   (metrics.U_FRACTION_ATOL: round-off)
        ref_misaligned_fraction = mean(delta_ref < 0)

    in the log-prob space of the trainer's loss, with the evaluation's prefix (``eval_u_fraction``; ``eval_<name>_...``
    for a dict of eval sets), through ``trainer.log`` (a record right after the evaluation's own, at the same step) and
    into the metrics dict ``evaluate`` returns (so ``metric_for_best_model="eval_u_fraction"`` works). Cost: one extra
    no-grad forward of the policy over the eval set per evaluation, plus one of the reference when it is live. It
    writes no per-pair file and logs nothing at training steps.
    """

    def __init__(self, trainer: DPOTrainer):
        warnings.warn(
            "UFractionCallback is deprecated: use trl_cpo.DiagnosticsCallback, which logs u_fraction with ranking "
            "accuracy, likelihood displacement and gradient saturation at every step, without an extra forward.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(trainer, pairs="no", log_steps=False)

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        if eval_dataloader is None or metrics is None:
            return
        prefix = _trl_compat.metric_prefix(metrics)
        values = {f"{prefix}_{name}": value for name, value in self.compute(eval_dataloader).items()}
        metrics.update(values)
        self.trainer.log(dict(values))

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
