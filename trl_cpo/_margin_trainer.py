"""Wiring shared by `CPOTrainer` and `ECPOCTrainer`: a per-pair reference margin on top of TRL's DPOTrainer.

Both losses equal DPO's sigmoid loss with the reference log-odds raised by a per-pair constant:

    -log sigmoid(beta * (delta_pi - delta_ref) - margin) = -log sigmoid(beta * (delta_pi - (delta_ref + margin/beta)))

so at each step the trainers compute `margin` from the batch's reference log-probs and completion lengths, wherever
those come from (precomputed columns, or DPOTrainer's own live reference forward: `trl_cpo.reference_source`), and
hand DPOTrainer's own loss code a batch whose `ref_chosen_logps` carries that shift. The forward pass, log-prob
aggregation, PEFT, reference handling and saving all stay DPOTrainer's. What the shift would distort, the `rewards/*`
metrics, is recomputed with DPO's meaning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from . import _trl_compat
from ._config_utils import ensure_writable_output_dir, from_dpo_config
from ._distributed import end_distributed_run
from ._grad_check import FirstStepGradientCheck
from .callbacks import DiagnosticsCallback
from .checkpoints import prepare_resume, save_reference, write_after_trainer_state
from .data import LengthReport, prepare_with_length_report, validate_datasets
from .diagnostics import step_metrics
from .logps import PolicyLogpsRecorder, is_length_normalized, to_loss_space
from .methods import Method
from .model_card import write_model_card
from .nonfinite import NonFiniteGradientGuard, check_loss, check_weights
from .pair_checks import check_identical_pairs
from .precompute import ReferencePrecompute
from .quantization import keep_4bit_layers_trainable
from .reference import ReferenceLogps
from .reference_source import RunningReference, resolve_precompute
from .report import ReferenceReport, reference_report
from .report_callback import REPORT_MARKER

logger = logging.getLogger(__name__)

#: Columns DPOTrainer reads its precomputed reference log-probs from (summed over completion tokens).
REFERENCE_COLUMNS = _trl_compat.REFERENCE_COLUMNS


class _ReferenceMarginTrainer(ReferencePrecompute, DPOTrainer):
    """DPOTrainer whose loss target is raised by a per-pair margin computed once from the frozen reference."""

    #: The method's entry in `trl_cpo.methods.METHODS` (config class, target, logged metric).
    method: Method

    def __init__(
        self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None, **kwargs
    ):
        _trl_compat.check_dpo_trainer()
        config = self._resolve_args(args, model)
        ensure_writable_output_dir(config)  # as the Trainer would create it, but before the model loads
        #: Whether the user asked for the precompute (True) rather than letting the data decide (None).
        self._precompute_asked = config.precompute_ref_log_probs is True
        args = resolve_precompute(
            config,
            train_dataset,
            eval_dataset,
            trainer_name=type(self).__name__,
            from_dpo_config=type(args) is DPOConfig,
        )
        if not args.precompute_ref_log_probs:
            self._check_live_reference(args)
        if isinstance(model, torch.nn.Module):
            # Before DPOTrainer reads the model's state dict, which would silently "undo" a bitsandbytes CPU repack.
            keep_4bit_layers_trainable(model)
        validate_datasets(train_dataset, eval_dataset)
        #: What `max_length` dropped or truncated in each prepared dataset (`trl_cpo.data.LengthReport`), by name.
        self.length_reports: dict[str, LengthReport] = {}
        # `train_reference_logps`, `eval_reference_logps`, `reference_report`: filled when first needed
        # (`trl_cpo.precompute`).
        self._init_precompute()
        #: Live reference only: the train pairs' reference log-probs seen so far.
        self._running_reference = RunningReference()
        self._report_logged = False
        self._metric_prefix = "eval"
        #: Defaults for `create_model_card`'s keyword arguments (dataset_name, base_model_id, license, ...), so the
        #: cards DPOTrainer writes at each checkpoint (and pushes with `hub_strategy`) are as complete as the last.
        self.model_card_kwargs: dict[str, Any] = {}
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self._deferring = False  # DPOTrainer's precompute calls are recorded; later ones compute at once
        self._policy_logps = PolicyLogpsRecorder(self.model)
        # Under DeepSpeed and FSDP `.grad` does not hold a rank's full gradient: only the 4-bit layout is checked.
        self.add_callback(
            FirstStepGradientCheck(inspect_grads=not (self.is_deepspeed_enabled or self.is_fsdp_enabled))
        )
        if self.args.stop_on_nonfinite:  # after the first-step check, which names the first step's problems
            self.add_callback(NonFiniteGradientGuard(self))
        #: Writes the per-pair files (`pair_diagnostics`); the per-step diagnostics are logged by the loss step.
        self.diagnostics = DiagnosticsCallback(self, pairs=self.args.pair_diagnostics, log_steps=False)
        self.add_callback(self.diagnostics)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is not None:
            validate_datasets(None, eval_dataset)
        self.precompute_reference(*[key for key in self._pending if key[0] == "eval"])
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL's preparation, unchanged, plus the count of what `max_length` drops and truncates (`LengthReport`),
        # logged once per dataset; a dataset left empty is refused here rather than failing in the precompute.
        # Pairs whose chosen and rejected token ids are the same (as truncated) are refused or counted.
        prepare = super()._prepare_dataset
        if not isinstance(dataset, Dataset) or args.max_length is None or len(dataset) == 0:
            return check_identical_pairs(prepare(dataset, processing_class, args, dataset_name), args, dataset_name)
        prepared, report = prepare_with_length_report(prepare, dataset, processing_class, args, dataset_name)
        message = report.message()
        if message and args.should_log and report != self.length_reports.get(dataset_name):
            logger.warning(message)
        self.length_reports[dataset_name] = report
        return check_identical_pairs(prepared, args, dataset_name, report.dropped_rows)

    @classmethod
    def _resolve_args(cls, args, model):
        config_cls = cls.method.config_class
        if args is None:
            name = model if isinstance(model, str) else _trl_compat.get_config_model_id(model.config)
            return config_cls(f"{str(name).split('/')[-1]}-{config_cls._method_name}")
        if isinstance(args, config_cls):
            return args
        if type(args) is DPOConfig:
            return from_dpo_config(args, config_cls)
        raise TypeError(
            f"{cls.__name__} takes a {config_cls.__name__} (or a plain trl.DPOConfig, kept as is); got "
            f"{type(args).__name__}."
        )

    @property
    def length_normalized(self) -> bool:
        """Whether the loss runs on per-token averaged log-probs (`loss_type` 'sigmoid_norm') rather than sums."""
        return is_length_normalized(self.args.loss_type)

    def reference_margin(self, reference: ReferenceLogps) -> torch.Tensor:
        """Per-pair logit margin `beta * (target - delta_ref)` that raises DPO's target to the method's, in the loss's
        space: handing DPO's loss `delta_ref + margin / beta` as the reference log-odds gives the method's loss."""
        target = self.method.target_from_config(reference, self.args)
        return self.args.beta * (target - reference.delta_ref(self.length_normalized))

    def _choose_method_settings(self, reference: ReferenceLogps) -> None:
        """Settings chosen from the train set's reference before any margin is computed (CPO's `cpo_auto_gamma`)."""

    def _report(self, reference: ReferenceLogps) -> ReferenceReport:
        return reference_report(
            reference.chosen, reference.rejected, reference.chosen_lengths, reference.rejected_lengths, self.args
        )

    def _check_live_reference(self, args) -> None:
        """Refuse, before anything loads, what a live reference cannot do for this method (CPO's `cpo_auto_gamma`)."""

    # -- loss and metrics ---------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = _trl_compat.metrics_mode(self)
        live = _trl_compat.REF_CHOSEN_LOGPS not in inputs
        if live:
            # DPOTrainer's own reference forward (ref_model, or the policy with its adapter disabled), run here rather
            # than inside its loss so that the margin can shift it; the loss then reads it from the batch.
            ref_chosen, ref_rejected = _trl_compat.reference_logps(self, self.ref_model or self.model, inputs)
        else:
            ref_chosen, ref_rejected = inputs[_trl_compat.REF_CHOSEN_LOGPS], inputs[_trl_compat.REF_REJECTED_LOGPS]
        chosen_lengths, rejected_lengths = _trl_compat.sigmoid_norm_lengths(inputs[_trl_compat.COMPLETION_MASK])
        reference = ReferenceLogps(ref_chosen.float(), ref_rejected.float(), chosen_lengths, rejected_lengths)
        margin = self.reference_margin(reference)
        # Raise the reference log-odds by margin/beta in the loss's space: summed log-probs take it as is; TRL's
        # 'sigmoid_norm' divides by the completion length (clamped to 1, as here), so the shift is pre-multiplied.
        shift = margin / self.args.beta
        if self.length_normalized:
            shift = shift * chosen_lengths
        shifted = {
            **inputs,
            _trl_compat.REF_CHOSEN_LOGPS: ref_chosen + shift.to(ref_chosen.dtype),
            _trl_compat.REF_REJECTED_LOGPS: ref_rejected,
        }
        with self._policy_logps.recording(), _trl_compat.loss_reads_batch_reference(self):
            result = super().compute_loss(model, shifted, return_outputs, num_items_in_batch)
        if mode == "train" and self.args.stop_on_nonfinite:
            check_loss(self, result[0] if return_outputs else result, margin)
        policy_chosen, policy_rejected = self._policy_logps.sequence_logps(inputs[_trl_compat.COMPLETION_MASK])
        self._log_reference_metrics(
            mode,
            live,
            policy_chosen.float(),
            policy_rejected.float(),
            reference.chosen,
            reference.rejected,
            chosen_lengths,
            rejected_lengths,
            margin.float(),
        )
        return result

    @torch.no_grad()
    def _log_reference_metrics(self, mode, live: bool, *per_pair: torch.Tensor) -> None:
        # Training gathers like DPOTrainer's own reward metrics. `gather_for_metrics` would drop "duplicates" from
        # every micro-batch of the last gradient-accumulation window (the Trainer prefetches the window, so the
        # dataloader already reports its end); in evaluation it correctly drops the samples that even_batches repeated.
        gather = self.accelerator.gather if mode == "train" else self.accelerator.gather_for_metrics
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, margin = gather(per_pair)
        if live and mode == "train":
            self._running_reference.add(ref_chosen, ref_rejected, chosen_len, rejected_len)
        lengths = (chosen_len, rejected_len, self.length_normalized)
        space = (
            *to_loss_space(policy_chosen, policy_rejected, *lengths),
            *to_loss_space(ref_chosen, ref_rejected, *lengths),
        )
        metrics = _trl_compat.metric_lists(self, mode)
        delta_ref = space[2] - space[3]
        target = delta_ref + margin / self.args.beta
        # U, the reference's misalignment, ranking accuracy, likelihood displacement, saturation (trl_cpo.diagnostics).
        logits = self.args.beta * (space[0] - space[1] - target)
        for name, value in step_metrics(*space, logits).items():
            metrics[name].append(value)
        metrics[self.method.metric_name].append(self.method.metric(target, delta_ref, self.args.beta).mean().item())
        # DPOTrainer logged its rewards from the shifted batch; overwrite them with DPO's meaning,
        # beta * (logp - ref_logp) on summed log-probs, so they stay comparable with a DPO run.
        chosen_rewards = self.args.beta * (policy_chosen - ref_chosen)
        rejected_rewards = self.args.beta * (policy_rejected - ref_rejected)
        metrics["rewards/chosen"][-1] = chosen_rewards.mean().item()
        metrics["rewards/rejected"][-1] = rejected_rewards.mean().item()
        metrics["rewards/accuracies"][-1] = (chosen_rewards > rejected_rewards).float().mean().item()
        metrics["rewards/margins"][-1] = (chosen_rewards - rejected_rewards).mean().item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The reference report rides on training log entries rather than one of its own, so `log_history` keeps
        # DPOTrainer's layout: precomputed, it goes out once with the first one; live, its running values go with each.
        mode = _trl_compat.metrics_mode(self)
        if mode == "train" and not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **self._reference_logs()}
        elif mode == "eval" and self._metric_prefix != "eval":
            # One set of an eval dict: DPOTrainer.log would put every step metric under "eval_", so the sets would
            # overwrite each other's; they go out under this evaluation's own prefix ("eval_<name>_u_fraction").
            pending = _trl_compat.metric_lists(self, "eval")
            logs = {**logs, **{f"{self._metric_prefix}_{k}": sum(v) / len(v) for k, v in pending.items() if v}}
            pending.clear()
        super().log(logs, start_time)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self._metric_prefix = metric_key_prefix  # "eval", or "eval_<name>" for one set of an eval dict
        return super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)

    def _reference_logs(self) -> dict[str, float]:
        if not self.args.precompute_ref_log_probs:
            running = self._running_reference.reference()
            if running is None:
                return {}
            self.reference_report = self._report(running)
            return self.reference_report.to_logs()
        if self.reference_report is None or self._report_logged:
            return {}
        self._report_logged = True
        if any(REPORT_MARKER in entry for entry in self.state.log_history):
            return {}  # a resumed run's history has it already
        return self.reference_report.to_logs()

    # -- checkpoints and resume ---------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        # The reference file is written last, right after the Trainer's trainer_state.json (so a folder holding it is
        # complete), and before the Hub push of the folder (`hub_strategy="checkpoint"` uploads it from inside the
        # parent's `_save_checkpoint`) and the deletion of older checkpoints.
        folder = _trl_compat.checkpoint_folder(self, trial)
        written = False

        def write_reference():
            nonlocal written
            if not written:
                written = True
                save_reference(self, folder)

        with write_after_trainer_state(self, folder, write_reference):
            super()._save_checkpoint(model, trial)
        write_reference()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Also the first thing a checkpoint save writes: non-finite weights stop it before any file.
        if self.args.stop_on_nonfinite:
            check_weights(self, self.model, output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # `True` means the newest complete checkpoint. What can refuse the resume is checked before any reference
        # forward, and a checkpoint's valid reference is used as is; what is still pending is computed now, before
        # the first step, while the policy is the reference.
        resume_from_checkpoint = prepare_resume(self, resume_from_checkpoint)
        self.precompute_reference()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def predict(self, test_dataset, *args, **kwargs):
        self.precompute_reference(*[key for key in self._pending if key[0] == "eval"])
        return super().predict(test_dataset, *args, **kwargs)

    def _margin_settings(self) -> dict[str, object]:
        """The settings that shape the per-pair margin: a resumed run must use the same ones (checked on resume).

        The method, its fields, `beta`, `loss_type` (the log-prob space) and the truncation that decides which tokens
        the reference scored. The token ids themselves are bound by the pairs' digests.
        """
        loss_type = [self.args.loss_type] if isinstance(self.args.loss_type, str) else list(self.args.loss_type)
        return {
            "method": self.method.name,
            "beta": self.args.beta,
            "loss_type": loss_type,
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            **self.method.settings(self.args),
        }

    def _restore_chosen_settings(self, saved_settings: dict, checkpoint: str) -> None:
        """Take back settings the run chose from its data (CPO's `cpo_auto_gamma`); see `CPOTrainer`."""

    def end(self):
        """Finish the trackers and destroy the process group, as `Trainer.end`, without the gloo teardown deadlock
        (`trl_cpo._distributed`): all ranks meet first, and the group outlives DDP's reducer."""
        end_distributed_run(super().end, self.accelerator.wait_for_everyone)

    # -- model card ---------------------------------------------------------------------------------------------------

    def create_model_card(
        self, model_name=None, dataset_name=None, tags=None, *, base_model_id: str | None = None, license=None
    ):
        """Write TRL's model card to `output_dir/README.md`, extended with the method (`trl_cpo.model_card`).

        `dataset_name` is a name or a list of names; only Hub ids are linked. `base_model_id` names the Hub model a
        local base was downloaded from, and `license` sets the card's license (else the base model's own card's).
        `push_to_hub(...)` passes its keyword arguments here; unset ones default to `self.model_card_kwargs`.
        """
        given = dict(
            model_name=model_name, dataset_name=dataset_name, tags=tags, base_model_id=base_model_id, license=license
        )
        card_kwargs = {**self.model_card_kwargs, **{k: v for k, v in given.items() if v is not None}}
        if not self.is_world_process_zero():
            return
        model_name = card_kwargs.pop("model_name", None) or Path(self.args.output_dir).name
        super().create_model_card(model_name=model_name, tags=card_kwargs.pop("tags", None))  # TRL's card
        write_model_card(self, model_name=model_name, **card_kwargs)
