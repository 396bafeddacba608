"""The registry of every private TRL / transformers name or behaviour trl_cpo relies on (`trl_cpo._trl_compat`).

Each `Assumption` says what is assumed, which trl_cpo code relies on it and where in TRL it comes from; the thin
functions and constants that use it live in `trl_cpo._trl_compat`, and `tests/test_trl_contract.py` checks each one
against the installed TRL, failing with `Assumption.broken()`'s message.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

#: TRL versions on which `tests/test_trl_contract.py` passed (the `trl` pin in pyproject.toml says the same).
TESTED_TRL_VERSIONS = ("1.16.0",)


@dataclass(frozen=True)
class Assumption:
    """One thing trl_cpo assumes about TRL (or transformers), where it relies on it and where it comes from."""

    key: str
    #: What is assumed, in one sentence.
    summary: str
    #: trl_cpo code that relies on it (`trl_cpo.<module>.<name>`).
    used_by: tuple[str, ...]
    #: "module:qualified.name" of the TRL / transformers code it was read from (resolved to file and line).
    origin: str

    def source(self) -> str:
        """`trl/trainer/dpo_trainer.py:1285 DPOTrainer._compute_loss`: the origin in the installed package."""
        module_name, qualname = self.origin.split(":")
        path = module_name.replace(".", "/") + ".py"
        try:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            obj = inspect.unwrap(obj)
            line = inspect.getsourcelines(obj)[1]
        except (AttributeError, ImportError, OSError, TypeError):
            return f"{path} {qualname} (not found in this version)"
        return f"{path}:{line} {qualname}"

    def broken(self, detail: str = "") -> str:
        """The message a contract test (or a runtime check) fails with."""
        package = self.origin.split(".")[0]
        version = importlib.import_module(package).__version__
        trl_version = importlib.import_module("trl").__version__
        message = (
            f"TRL contract broken: {self.summary} (relied on by {', '.join(self.used_by)}; from {self.source()} in "
            f"{package} {version}; contract tested on trl {', '.join(TESTED_TRL_VERSIONS)}, installed {trl_version})"
        )
        return f"{message}: {detail}" if detail else message


_DPO = "trl.trainer.dpo_trainer"
_TRAINER = "transformers.trainer"

ASSUMPTIONS: dict[str, Assumption] = {
    a.key: a
    for a in (
        Assumption(
            "batch_layout",
            "a preference batch stacks chosen then rejected rows on dim 0 ([chosen; rejected]) with keys input_ids, "
            "attention_mask, completion_mask (1 on completion tokens) and, once precomputed, ref_chosen_logps / "
            "ref_rejected_logps (one summed completion log-prob per pair)",
            (
                "trl_cpo._margin_trainer._ReferenceMarginTrainer.compute_loss",
                "trl_cpo.reference.compute_reference_logps",
                "trl_cpo.callbacks.DiagnosticsCallback",
            ),
            f"{_DPO}:DataCollatorForPreference.torch_call",
        ),
        Assumption(
            "collator",
            "the trainer's data_collator (DataCollatorForPreference for text data) builds that batch from tokenized "
            "rows with prompt_ids, chosen_ids, rejected_ids (and optional ref_chosen_logps / ref_rejected_logps), "
            "truncating each prompt + completion to max_length there (not at tokenization); the prepared dataset "
            "carries those columns",
            (
                "trl_cpo.reference.compute_reference_logps",
                "trl_cpo.fingerprint.data_digest",
                "trl_cpo.scripts.audit.score.score",
            ),
            f"{_DPO}:DPOTrainer._prepare_dataset",
        ),
        Assumption(
            "loss_reads_batch_reference",
            "while trainer.precompute_ref_logps is True (set from precompute_ref_log_probs, and by the trainers for "
            "the loss call when they ran the live reference forward themselves), _compute_loss reads the reference "
            "from the batch's ref_chosen_logps / ref_rejected_logps and runs no reference forward; 'sigmoid' is -logsigmoid(beta * ((pi_w - ref_w) - (pi_l - "
            "ref_l))), so raising ref_chosen_logps by s lowers the log-odds by s",
            ("trl_cpo._margin_trainer._ReferenceMarginTrainer.compute_loss",),
            f"{_DPO}:DPOTrainer._compute_loss",
        ),
        Assumption(
            "sigmoid_norm_lengths",
            "'sigmoid_norm' divides each completion's log-ratio by completion_mask.sum(dim=1).clamp(min=1) (the "
            "unshifted mask, chosen and rejected halves)",
            (
                "trl_cpo._margin_trainer._ReferenceMarginTrainer.compute_loss",
                "trl_cpo.logps.completion_lengths",
            ),
            f"{_DPO}:DPOTrainer._compute_loss",
        ),
        Assumption(
            "loss_weights",
            "the loss is sum_i loss_weights[i] * mean(term_i) over loss_type, and 'sft' is the mean negative "
            "log-prob of the chosen completion tokens (it reads no reference, so the margin reaches only the "
            "preference term)",
            ("trl_cpo._config_utils.validate_dpo_fields (MIXABLE_LOSS_TYPES)",),
            f"{_DPO}:DPOTrainer._compute_loss",
        ),
        Assumption(
            "fused_lm_head",
            "_compute_loss makes one policy forward, model(**inputs, labels=..., fused_lm_head=True), through the "
            "outermost model's __call__, whose output.log_probs is [2 * pairs, seq_len - 1 (+ virtual tokens)] "
            "per-token log-probs, zero outside the completion; summed over the last seq_len - 1 positions they are "
            "the completion log-probs",
            (
                "trl_cpo._margin_trainer._PolicyLogpsRecorder",
                "trl_cpo.callbacks.DiagnosticsCallback._policy_logps",
            ),
            f"{_DPO}:DPOTrainer._compute_loss",
        ),
        Assumption(
            "loss_forwards",
            "Trainer.training_step and DPOTrainer.prediction_step call the instance's compute_loss(model, inputs, ...) "
            "once per micro-batch; in it, the policy's fused-LM-head forward of trainer.model comes first, and a live "
            "reference forward is the ref_model's fused-head call or, for a PEFT policy without ref_model, the second "
            "fused-head call of trainer.model, with the adapter disabled",
            ("trl_cpo.callbacks.DiagnosticsCallback._install_step_metrics",),
            f"{_DPO}:DPOTrainer._compute_loss",
        ),
        Assumption(
            "compute_ref_log_probs",
            "trainer.compute_ref_log_probs(model, batch) returns the (chosen, rejected) summed completion log-probs of "
            "model, with the PEFT adapter disabled when there is no ref_model",
            ("trl_cpo.reference.compute_reference_logps", "trl_cpo.callbacks.DiagnosticsCallback"),
            f"{_DPO}:DPOTrainer.compute_ref_log_probs",
        ),
        Assumption(
            "precompute_hook",
            "_precompute_ref_logps(dataset, name, batch_size) -> dataset is called once per dataset: in __init__ for "
            "the train set ('train', passed as the object trainer.train_dataset) then each eval set ('eval' or the eval "
            "dict's keys), and in evaluate() for each dataset passed to it; its return value replaces the dataset",
            ("trl_cpo.precompute.ReferencePrecompute._precompute_ref_logps",),
            f"{_DPO}:DPOTrainer._precompute_ref_logps",
        ),
        Assumption(
            "precompute_model",
            "during the precompute the reference is trainer.ref_model if set, else trainer.model; under DeepSpeed "
            "without ref_model, an inference engine built once with trl.models.prepare_deepspeed(model, accelerator) "
            "and kept in trainer._precompute_engine (None until then)",
            ("trl_cpo.reference._reference_model",),
            f"{_DPO}:DPOTrainer._precompute_ref_logps",
        ),
        Assumption(
            "metric_lists",
            "trainer._metrics[mode] (mode 'train' if model.training else 'eval') is a dict of lists; _compute_loss "
            "appends one value per call to each of rewards/chosen, rewards/rejected, rewards/accuracies, "
            "rewards/margins; log() averages every list of the mode (extra keys too), prefixes 'eval_' in "
            "evaluation and clears them",
            ("trl_cpo._margin_trainer._ReferenceMarginTrainer._log_reference_metrics",),
            f"{_DPO}:DPOTrainer.log",
        ),
        Assumption(
            "save_checkpoint",
            "_save_checkpoint(model, trial) saves into <_get_output_dir(trial)>/checkpoint-<global_step> (the folder "
            "get_last_checkpoint finds): the model files, then optimizer / scheduler / RNG states, then "
            "self.state.save_to_json(<folder>/trainer_state.json) as its last write, then the push from inside when "
            "hub_strategy='checkpoint', then the deletion of checkpoints beyond save_total_limit",
            (
                "trl_cpo._margin_trainer._ReferenceMarginTrainer._save_checkpoint",
                "trl_cpo._margin_trainer._ReferenceMarginTrainer.train",
                "trl_cpo.checkpoints.write_after_trainer_state",
                "trl_cpo.checkpoints.complete_checkpoint_problem",
            ),
            f"{_TRAINER}:Trainer._save_checkpoint",
        ),
        Assumption(
            "prepare_dataset",
            "_prepare_dataset(dataset, processing_class, args, dataset_name) returns the tokenized dataset "
            "(prompt_ids, chosen_ids, rejected_ids) in input order with the input's other columns kept, less the "
            "pairs whose tokenized prompt has at least args.max_length tokens (truncation_mode 'keep_start'); it "
            "reads args.max_length for that filter only",
            ("trl_cpo._margin_trainer._ReferenceMarginTrainer._prepare_dataset",),
            f"{_DPO}:DPOTrainer._prepare_dataset",
        ),
        Assumption(
            "model_card",
            "DPOTrainer.__init__ adds the class attribute _tag_names to the model's tags; _save_checkpoint calls "
            "self.create_model_card(model_name=...) for every checkpoint, and Trainer.push_to_hub(**kwargs) calls "
            "self.create_model_card(model_name=..., **kwargs) (the trainers override it with their own card); "
            "DPOTrainer._paper holds the DPO paper's title, id and citation",
            (
                "trl_cpo.cpo_trainer.CPOTrainer",
                "trl_cpo.ecpoc_trainer.ECPOCTrainer",
                "trl_cpo._margin_trainer._ReferenceMarginTrainer.create_model_card",
                "trl_cpo.model_card.extend_model_card",
                "trl_cpo.methods.METHODS",
            ),
            f"{_DPO}:DPOTrainer._save_checkpoint",
        ),
        Assumption(
            "get_config_model_id",
            "trl.trainer.utils.get_config_model_id(config) is the model's name or path (config._name_or_path)",
            (
                "trl_cpo._margin_trainer._ReferenceMarginTrainer._resolve_args",
                "trl_cpo.model_card.extend_model_card",
            ),
            "trl.trainer.utils:get_config_model_id",
        ),
        Assumption(
            "model_card_template",
            "DPOTrainer.create_model_card(model_name, dataset_name, tags) writes output_dir/README.md from TRL's "
            "lm_model_card.md: an opening 'This model is a fine-tuned version of ...' line and an 'It has been trained "
            "using [TRL](...)' line, model=\"<hub_model_id>\" in the quick start, '### Framework versions', 'Cite TRL "
            "as:', and a misspelled 'licence' metadata key",
            (
                "trl_cpo._margin_trainer._ReferenceMarginTrainer.create_model_card",
                "trl_cpo.model_card.extend_model_card",
            ),
            "trl.trainer.base_trainer:_BaseTrainer.create_model_card",
        ),
        Assumption(
            "save_without_push",
            "Trainer.save_model(output_dir, _internal_call=True) saves the model without pushing it, even with "
            "args.push_to_hub set",
            ("trl_cpo.model_card.write_hub_dry_run",),
            f"{_TRAINER}:Trainer.save_model",
        ),
        Assumption(
            "push_ignore_patterns",
            "Trainer.push_to_hub uploads output_dir without the files matching '_*' and 'checkpoint-*'",
            ("trl_cpo.model_card.hub_upload_files",),
            f"{_TRAINER}:Trainer.push_to_hub",
        ),
        Assumption(
            "ddp_ignored_buffers",
            "DistributedDataParallel skips the parameters and buffers named in module._ddp_params_and_buffers_to_ignore",
            ("trl_cpo.scripts.train.main (--ignore_bias_buffers)",),
            "torch.nn.parallel.distributed:DistributedDataParallel.__init__",
        ),
        Assumption(
            "disable_gradient_checkpointing",
            "trl.models.utils.disable_gradient_checkpointing(model, kwargs) switches gradient checkpointing off "
            "inside the block and back on after",
            ("trl_cpo.callbacks.DiagnosticsCallback._policy_logps",),
            "trl.models.utils:disable_gradient_checkpointing",
        ),
        Assumption(
            "prepare_inputs",
            "Trainer._prepare_inputs(batch) returns the batch on the trainer's device",
            ("trl_cpo.callbacks.DiagnosticsCallback._batch_logps",),
            f"{_TRAINER}:Trainer._prepare_inputs",
        ),
        Assumption(
            "eval_metric_prefix",
            "the metrics evaluate() hands to on_evaluate hold '<metric_key_prefix>_runtime' ('eval', or "
            "'eval_<name>' for a dict of eval sets)",
            ("trl_cpo.callbacks.DiagnosticsCallback.on_evaluate", "trl_cpo.callbacks.UFractionCallback.on_evaluate"),
            "transformers.trainer_utils:speed_metrics",
        ),
    )
}
