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

import contextlib
import copy
import json
import os
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer

from . import _trl_compat
from ._config_utils import from_dpo_config, logger
from ._distributed import end_distributed_run
from ._grad_check import FirstStepGradientCheck
from .checkpoints import complete_checkpoint_problem, last_complete_checkpoint, write_after_trainer_state
from .data import (
    LengthReport,
    describe_pair_difference,
    fingerprint,
    pair_digests,
    pair_lengths,
    token_lengths,
    validate_preference_dataset,
)
from .logps import is_length_normalized, to_loss_space
from .methods import Method
from .metrics import U_FRACTION_ATOL, ref_misaligned_fraction, u_fraction
from .model_card import write_model_card
from .quantization import keep_4bit_layers_trainable
from .reference import (
    REFERENCE_FILE,
    ReferenceFileError,
    ReferenceLogps,
    checkpoint_reference_path,
    compute_reference_logps,
    load_reference_checkpoint,
    read_reference_metadata,
    save_reference_checkpoint,
    with_columns,
)
from .reference_file import load_matching_reference_logps, reference_fingerprint
from .reference_source import RunningReference, resolve_precompute
from .report import ReferenceReport, reference_report
from .report_callback import REPORT_MARKER, announce_report

#: Columns DPOTrainer reads its precomputed reference log-probs from (summed over completion tokens).
REFERENCE_COLUMNS = _trl_compat.REFERENCE_COLUMNS
#: Temporary column that tells which rows TRL's length filter kept (removed before the dataset is used).
_ROW_COLUMN = "__trl_cpo_row__"


class _PolicyLogpsRecorder:
    """Keep the per-token log-probs of the policy's fused-head forward made inside `recording()`.

    DPOTrainer reduces the policy log-probs to a scalar loss; the U-fraction and the DPO-meaning rewards need them per
    pair. A forward hook on the outermost model sees the output of that one forward (DDP, FSDP and DeepSpeed call the
    module through `__call__`), so no second forward is needed.
    """

    def __init__(self, model: torch.nn.Module):
        self._active = False
        self.log_probs: torch.Tensor | None = None
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        log_probs = _trl_compat.fused_head_log_probs(kwargs, output) if self._active else None
        if log_probs is not None and self.log_probs is None:
            self.log_probs = log_probs.detach()

    @contextlib.contextmanager
    def recording(self):
        self._active, self.log_probs = True, None
        try:
            yield self
        finally:
            self._active = False

    def sequence_logps(self, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.log_probs is None:
            raise RuntimeError(
                _trl_compat.ASSUMPTIONS["fused_lm_head"].broken("no fused-LM-head forward of the policy was seen")
            )
        # Same reduction as DPOTrainer without ld_alpha (rejected by the config): the fused head already zeroes
        # non-completion positions, so a plain sum over the (shifted) sequence is the completion log-prob.
        return _trl_compat.summed_completion_logps(self.log_probs, completion_mask)


class _ReferenceMarginTrainer(DPOTrainer):
    """DPOTrainer whose loss target is raised by a per-pair margin computed once from the frozen reference."""

    #: The method's entry in `trl_cpo.methods.METHODS` (config class, target, logged metric).
    method: Method

    def __init__(
        self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None, **kwargs
    ):
        _trl_compat.check_dpo_trainer()
        args = resolve_precompute(
            self._resolve_args(args, model),
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
        self._validate_datasets(train_dataset, eval_dataset)
        #: What `max_length` dropped or truncated in each prepared dataset (`trl_cpo.data.LengthReport`), by name.
        self.length_reports: dict[str, LengthReport] = {}
        #: Reference log-probs of the train set and of each eval set (keyed like DPOTrainer names them: "eval", or
        #: the keys of an eval dict), filled by the precompute.
        self.train_reference_logps: ReferenceLogps | None = None
        self.eval_reference_logps: dict[str, ReferenceLogps] = {}
        #: What the reference says about the train set (`trl_cpo.report`): computed at the precompute, or (live
        #: reference) over the train pairs seen so far, refreshed at each log.
        self.reference_report: ReferenceReport | None = None
        #: Live reference only: the train pairs' reference log-probs seen so far.
        self._running_reference = RunningReference()
        self._report_logged = False
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
        self._policy_logps = _PolicyLogpsRecorder(self.model)
        # Under DeepSpeed and FSDP `.grad` does not hold a rank's full gradient: only the 4-bit layout is checked.
        self.add_callback(
            FirstStepGradientCheck(inspect_grads=not (self.is_deepspeed_enabled or self.is_fsdp_enabled))
        )

    @staticmethod
    def _validate_datasets(train_dataset, eval_dataset) -> None:
        """The raw-data checks of `trl_cpo.data` (shared with the audit), before TRL tokenizes anything."""
        validate_preference_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            for key, dataset in eval_dataset.items():
                validate_preference_dataset(dataset, f"eval_dataset[{key!r}]")
        elif isinstance(eval_dataset, Dataset) and not (
            # Datasets this trainer prepared already passed (e.g. `evaluate(trainer.eval_dataset)`).
            hasattr(eval_dataset, "column_names") and "prompt_ids" in eval_dataset.column_names
        ):
            validate_preference_dataset(eval_dataset, "eval_dataset")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is not None:
            self._validate_datasets(None, eval_dataset)
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL's preparation, unchanged, plus the count of what `max_length` drops and truncates (`LengthReport`),
        # logged once per dataset; a dataset left empty is refused here rather than failing in the precompute.
        if not isinstance(dataset, Dataset) or args.max_length is None or len(dataset) == 0:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        indexed = dataset.add_column(_ROW_COLUMN, list(range(len(dataset))))
        prepared = super()._prepare_dataset(indexed, processing_class, args, dataset_name)
        kept = prepared[_ROW_COLUMN]
        prepared = prepared.remove_columns(_ROW_COLUMN)
        dropped = sorted(set(range(len(dataset))) - set(kept))
        dropped_prompt_lengths, dropped_pair_lengths = [], []
        if dropped:
            # The dropped pairs' lengths, to say which max_length keeps them: the same preparation without the filter,
            # on those pairs only.
            unfiltered = copy.copy(args)
            unfiltered.max_length = None
            lost = super()._prepare_dataset(dataset.select(dropped), processing_class, unfiltered, dataset_name)
            dropped_prompt_lengths = token_lengths(lost, "prompt_ids").tolist()
            dropped_pair_lengths = pair_lengths(lost).tolist()
        report = LengthReport(
            name=self._dataset_label(dataset_name),
            max_length=args.max_length,
            num_pairs=len(dataset),
            dropped_rows=dropped,
            dropped_prompt_lengths=dropped_prompt_lengths,
            dropped_pair_lengths=dropped_pair_lengths,
            kept_pair_lengths=pair_lengths(prepared).tolist() if len(prepared) else [],
        )
        if len(prepared) == 0:
            raise report.all_dropped_error()
        message = report.message()
        if message and args.should_log and report != self.length_reports.get(dataset_name):
            logger.warning(message)
        self.length_reports[dataset_name] = report
        return prepared

    @staticmethod
    def _dataset_label(dataset_name: str) -> str:
        return {"train": "train_dataset", "eval": "eval_dataset"}.get(dataset_name, f"eval_dataset[{dataset_name!r}]")

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

    # -- precompute ---------------------------------------------------------------------------------------------------

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # Replaces DPOTrainer's precompute (same call sites: __init__ for the train set then each eval set, and
        # evaluate) with one that keeps the result in memory on every rank and adds the margin column.
        if isinstance(dataset, IterableDataset):
            # Only reached with an explicit precompute_ref_log_probs=True: fail in TRL's own words.
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # The precompute is an eval-mode, no-grad forward of the policy: keep bitsandbytes from repacking its 4-bit
        # layers into a CPU inference layout that cannot be trained afterwards.
        keep_4bit_layers_trainable(self.model)
        is_train = dataset is self.train_dataset
        # A dataset that went through this step before (e.g. `evaluate(trainer.eval_dataset)`) is recomputed from
        # scratch: its old columns must not reach the reference forward.
        stale = [c for c in REFERENCE_COLUMNS if c in dataset.column_names]
        dataset = dataset.remove_columns(stale) if stale else dataset
        row_digests = pair_digests(dataset)  # binds checkpoints (and the audit's file) to these exact pairs
        reference = None
        if is_train and getattr(self.args, "reference_logps_file", None):
            # One reference pass: the audit's file, if it was computed on these inputs (else a ValueError saying why).
            reference = load_matching_reference_logps(
                self.args.reference_logps_file, reference_fingerprint(self, dataset, row_digests)
            )
        if reference is None:
            reference = compute_reference_logps(
                self, dataset, batch_size=batch_size, desc=f"Computing reference margins for {name} dataset"
            )
        reference.row_digests = row_digests
        if is_train:
            self.train_reference_logps = reference
            self._choose_method_settings(reference)
            self.reference_report = self._report(reference)
            announce_report(self, self.reference_report)
        else:
            self.eval_reference_logps[name] = reference
        return self._with_reference(dataset, reference)

    @staticmethod
    def _with_reference(dataset, reference: ReferenceLogps):
        # DPOTrainer's own columns: the margin is computed from them in the loss step.
        columns = {_trl_compat.REF_CHOSEN_LOGPS: reference.chosen, _trl_compat.REF_REJECTED_LOGPS: reference.rejected}
        return with_columns(dataset, columns)

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
            self._stop_on_nonfinite(result[0] if return_outputs else result, margin)
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
    def _stop_on_nonfinite(self, loss: torch.Tensor, margin: torch.Tensor) -> None:
        """Raise before a non-finite loss or margin reaches the backward pass (config `stop_on_nonfinite`).

        Runs on every process's micro-batch and gathers the verdict, so all processes stop together (a lone rank
        raising would leave the others waiting in the gradient all-reduce).
        """
        flags = torch.stack([~torch.isfinite(margin).all(), ~torch.isfinite(loss).all()]).float().to(loss.device)
        margin_bad, loss_bad = self.accelerator.gather(flags.unsqueeze(0)).amax(dim=0).tolist()
        if not (margin_bad or loss_bad):
            return
        what = "reference margin" if margin_bad else "loss"
        cause = (
            "the per-pair margins come from the reference log-probs: a damaged reference file or data"
            if margin_bad
            else "fp16 overflow (use bf16 or fp32), a learning rate that diverges, or bad inputs"
        )
        raise FloatingPointError(
            f"Non-finite {what} (NaN or inf) at training step {self.state.global_step + 1}: training stopped before "
            "this step updates the weights, so no checkpoint holds NaN weights. Likely cause: "
            f"{cause}. Fix it and resume from the last checkpoint (resume_from_checkpoint=True). Set "
            "stop_on_nonfinite=False to keep TRL's behaviour instead (the step runs and the weights can become NaN)."
        )

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
        metrics["u_fraction"].append(u_fraction(*space, atol=U_FRACTION_ATOL).item())
        metrics["ref_misaligned_fraction"].append(ref_misaligned_fraction(*space[2:]).item())
        delta_ref = space[2] - space[3]
        target = delta_ref + margin / self.args.beta
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
        if _trl_compat.metrics_mode(self) == "train" and not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **self._reference_logs()}
        super().log(logs, start_time)

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
                self._save_reference_file(folder)

        with write_after_trainer_state(self, folder, write_reference):
            super()._save_checkpoint(model, trial)
        write_reference()

    def _save_reference_file(self, folder: str) -> None:
        if self.args.should_save and self.train_reference_logps is not None and os.path.isdir(folder):
            evals = {f"eval/{name}": reference for name, reference in self.eval_reference_logps.items()}
            splits = {"train": self.train_reference_logps, **evals}
            save_reference_checkpoint(folder, splits, metadata=self._reference_metadata(splits))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            # Resolved here rather than by the Trainer, whose choice (the highest step) may be a folder a kill left
            # incomplete: the newest complete one is taken, and the skipped ones are named.
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if not self.args.precompute_ref_log_probs:
            # Live reference: the margins come from the reference at each step; no reference file to restore.
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint):
            problem = complete_checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: {problem}. Pass an earlier checkpoint, or "
                    "resume_from_checkpoint=True, which takes the newest complete one."
                )
            if os.path.isfile(checkpoint_reference_path(resume_from_checkpoint)):
                self._restore_reference(resume_from_checkpoint)
            else:
                logger.warning(
                    "Checkpoint %s has no %s (its save was interrupted just before that last file, or it was "
                    "deleted): the reference log-probs are recomputed from the model given to this trainer, and "
                    "the pairs cannot be checked against the checkpoint's. Pass the model the run started from to "
                    "get the same margins.",
                    resume_from_checkpoint,
                    REFERENCE_FILE,
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

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

    def _reference_metadata(self, splits: dict[str, ReferenceLogps]) -> dict[str, object]:
        return {
            "method": self.method.name,
            "settings": self.method.settings(self.args),
            "margin_settings": self._margin_settings(),
            "fingerprints": {
                name: fingerprint(reference.row_digests)
                for name, reference in splits.items()
                if reference.row_digests is not None
            },
        }

    def _check_checkpoint_binding(self, checkpoint: str, saved: ReferenceLogps, metadata: dict) -> None:
        """Refuse a resume whose train pairs (token ids, order) or margin settings differ from the checkpoint's."""
        current = self.train_reference_logps
        problems = []
        if saved.row_digests is not None and current.row_digests is not None:
            difference = describe_pair_difference(saved.row_digests, current.row_digests)
        else:
            logger.warning(
                "Checkpoint %s predates data fingerprints: only the number of pairs and their completion lengths can "
                "be compared with this train_dataset.",
                checkpoint,
            )
            difference = (
                None
                if saved.same_pairs(current)
                else (f"trained on {len(saved)} pairs whose completion lengths differ from these {len(current)}")
            )
        if difference:
            problems.append(f"data: {difference} (pairs counted after TRL's tokenization and max_length filter)")
        saved_settings = metadata.get("margin_settings")
        if isinstance(saved_settings, dict):
            now = json.loads(json.dumps(self._margin_settings()))  # the form the file stores (tuples become lists)
            changed = [
                f"{key}: {saved_settings[key]!r} in the checkpoint, {now[key]!r} now"
                for key in now
                if key in saved_settings and saved_settings[key] != now[key]
            ]
            if changed:
                problems.append("margin settings: " + "; ".join(changed))
        if problems:
            raise ValueError(
                f"Cannot resume from {checkpoint}: its reference margins belong to another run. "
                + " ".join(f"[{problem}]" for problem in problems)
                + ". Resuming would apply the checkpoint's per-pair margins to other pairs or under other settings. "
                "To proceed, either resume with the same training data (the same rows in the same order, tokenizer "
                "and max_length) and the same margin settings as the run that wrote the checkpoint, or start a new "
                "run: drop resume_from_checkpoint, or use another output_dir."
            )

    def _restore_reference(self, checkpoint: str) -> None:
        """Train (and evaluate) against the reference log-probs the checkpoint was trained with."""
        saved = load_reference_checkpoint(checkpoint)
        metadata = read_reference_metadata(checkpoint)
        if "train" not in saved:
            raise ReferenceFileError(
                checkpoint_reference_path(checkpoint), f"it holds no 'train' split (its splits: {list(saved)})"
            )
        train = saved.pop("train")
        current = self.train_reference_logps
        self._check_checkpoint_binding(checkpoint, train, metadata)
        self._restore_chosen_settings(metadata.get("settings", {}), checkpoint)
        drift = max((train.chosen - current.chosen).abs().max(), (train.rejected - current.rejected).abs().max())
        if drift > 1e-4:
            logger.warning(
                "The reference rebuilt for this run differs from the one the checkpoint was trained against (max "
                "log-prob difference %.3g); resuming with the checkpoint's reference log-probs and margins.",
                drift.item(),
            )
        self.train_reference_logps = train
        self.reference_report = self._report(train)
        self.train_dataset = self._with_reference(self.train_dataset, train)
        for key, reference in saved.items():
            name = key.removeprefix("eval/")
            dataset, current = self._eval_dataset_named(name), self.eval_reference_logps.get(name)
            if dataset is None or current is None or not reference.same_pairs(current):
                logger.warning("Eval set %r of the checkpoint is not among this trainer's; left as computed.", name)
                continue
            self.eval_reference_logps[name] = reference
        # Every eval set gets margins from the restored reference and settings (a cpo_gamma chosen by cpo_auto_gamma).
        for name, reference in self.eval_reference_logps.items():
            dataset = self._eval_dataset_named(name)
            if dataset is not None:
                self._set_eval_dataset_named(name, self._with_reference(dataset, reference))

    def _restore_chosen_settings(self, saved_settings: dict, checkpoint: str) -> None:
        """Take back settings the run chose from its data (CPO's `cpo_auto_gamma`); see `CPOTrainer`."""

    def _eval_dataset_named(self, name: str):
        if isinstance(self.eval_dataset, dict):
            return self.eval_dataset.get(name)
        return self.eval_dataset if name == "eval" else None

    def _set_eval_dataset_named(self, name: str, dataset) -> None:
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {**self.eval_dataset, name: dataset}
        else:
            self.eval_dataset = dataset

    def end(self):
        """Finish the trackers and destroy the process group, as `Trainer.end`, without the gloo teardown deadlock
        (`trl_cpo._distributed`): all ranks meet first, and the group outlives DDP's reducer."""
        end_distributed_run(super().end, self.accelerator.wait_for_everyone)

    # -- model card ---------------------------------------------------------------------------------------------------

    def create_model_card(
        self, model_name=None, dataset_name=None, tags=None, *, base_model_id: str | None = None, license=None
    ):
        """Write the model card to `output_dir/README.md` (`trl_cpo.model_card.build_model_card`).

        `dataset_name` is a name or a list of names; only Hub ids are linked. `base_model_id` names the Hub model a
        local base was downloaded from, and `license` sets the card's license (else the base model's own card's).
        `push_to_hub(...)` passes its keyword arguments here; unset ones default to `self.model_card_kwargs`.
        """
        given = dict(
            model_name=model_name, dataset_name=dataset_name, tags=tags, base_model_id=base_model_id, license=license
        )
        write_model_card(self, **{**self.model_card_kwargs, **{k: v for k, v in given.items() if v is not None}})
