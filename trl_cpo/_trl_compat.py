"""Every private TRL / transformers name or behaviour trl_cpo relies on, in one place.

TRL's `DPOTrainer` has no public hook for a per-pair reference margin, so the trainers lean on some of its internals:
method names they override, batch keys, numerical conventions of its loss, its metric lists, the calls that write
the model card. Each one is declared here once, as a constant or a thin function whose docstring cites where it comes
from in TRL 1.16.0, and is registered in `ASSUMPTIONS`. The rest of the package goes through this module instead of touching
those names, so the coupling is listed in one file:

- `tests/test_trl_contract.py` checks each assumption against the installed TRL (its behaviour where that can be run
  on a tiny model, not just the name) and fails with `Assumption.broken()`'s message, which names the assumption, the
  trl_cpo code relying on it and the TRL function it came from, in the installed TRL version.
- `docs/trl-compatibility.md` lists them, with the TRL versions the contract tests pass on.

Public TRL / transformers API (`DPOTrainer`, `DPOConfig`, `Trainer` callbacks, `accelerator.gather*`) is used
directly elsewhere and is not listed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# TRL, transformers and torch are imported inside the functions: light modules (the configs, the reference file, the
# model card) use this one, and `trl-cpo --help` must not load them.


# The registry itself (`ASSUMPTIONS`) lives in `trl_cpo._trl_assumptions`; re-exported here for the rest of the package.
from ._trl_assumptions import ASSUMPTIONS, TESTED_TRL_VERSIONS, Assumption  # noqa: F401

# -- batch layout and collator (DataCollatorForPreference.torch_call, DPOTrainer._prepare_dataset) ----------------------

#: Batch key marking completion tokens (1) against prompt and padding (0).
COMPLETION_MASK = "completion_mask"
#: Batch keys / dataset columns of the precomputed reference log-probs, summed over completion tokens.
REF_CHOSEN_LOGPS = "ref_chosen_logps"
REF_REJECTED_LOGPS = "ref_rejected_logps"
REFERENCE_COLUMNS = (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS)
#: Batch keys that are not model inputs (DPOTrainer._compute_loss's `_non_model_keys`).
NON_MODEL_KEYS = (COMPLETION_MASK, *REFERENCE_COLUMNS)
#: Columns of a tokenized preference dataset, read by the collator.
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def sigmoid_norm_lengths(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) completion lengths as `loss_type='sigmoid_norm'` divides by them (float).

    DPOTrainer._compute_loss ('sigmoid_norm' branch): `completion_mask.chunk(2)[i].sum(dim=1).clamp(min=1.0)`, on the
    unshifted mask.
    """
    return completion_mask.sum(dim=1).float().clamp(min=1.0).chunk(2, dim=0)


# -- fused LM head (DPOTrainer._compute_loss, trl.trainer.utils.add_fused_lm_head) -------------------------------------


def fused_head_log_probs(call_kwargs: dict, output) -> torch.Tensor | None:
    """The per-token log-probs of a model call made by DPOTrainer's loss, or None for any other call.

    For a forward hook registered `with_kwargs=True`: DPOTrainer._compute_loss calls the policy as
    `model(**model_kwargs, labels=labels, fused_lm_head=True)` and reads `outputs.log_probs`.
    """
    return output.log_probs if call_kwargs.get("fused_lm_head") else None


def fused_forward_log_probs(model, batch: dict, *, exclude: tuple[str, ...] = ()) -> torch.Tensor:
    """Per-token log-probs of `batch` from `model`'s fused LM head, called as DPOTrainer._compute_loss calls it.

    Labels are `input_ids` with non-completion positions set to -100; keys in `NON_MODEL_KEYS` and `exclude` are not
    passed to the model. Returns `[2 * pairs, seq_len - 1 (+ virtual tokens)]`, zero outside the completion.
    """
    completion_mask = batch[COMPLETION_MASK]
    model_kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and k not in exclude}
    labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
    return model(**model_kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs


def summed_completion_logps(
    log_probs: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) completion log-probs from fused-head per-token log-probs, as DPOTrainer sums them.

    DPOTrainer._compute_loss without ld_alpha: `log_probs[:, -seq_len:].sum(dim=1)` with `seq_len` the shifted
    length (prompt-learning PEFT prepends virtual tokens, which the slice drops), then `.chunk(2)`.
    """
    seq_len = completion_mask.size(1) - 1
    return log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)


def reference_logps(trainer, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed reference log-probs of `batch`: `DPOTrainer.compute_ref_log_probs(model, batch)`."""
    return trainer.compute_ref_log_probs(model, batch)


def is_peft(model) -> bool:
    """`trl.models.utils.is_peft_model`-equivalent: whether `model` (or the model it wraps) is a PEFT model."""
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


@contextlib.contextmanager
def loss_reads_batch_reference(trainer) -> Iterator[None]:
    """Inside the block, DPOTrainer's `_compute_loss` takes the reference log-probs from the batch
    (`trainer.precompute_ref_logps`, which `_compute_loss` reads on each call) instead of running its own reference
    forward: the trainers ran that forward already, in live mode, to compute the margin from it."""
    saved = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = saved


# -- precompute (DPOTrainer.__init__, DPOTrainer.evaluate, DPOTrainer._precompute_ref_logps) ---------------------------

#: The DPOTrainer method the trainers override to run their own precompute (same signature and call sites).
PRECOMPUTE_METHOD = "_precompute_ref_logps"


def deepspeed_precompute_engine(trainer):
    """The DeepSpeed inference engine DPOTrainer keeps for reference forwards of a not-yet-prepared policy.

    DPOTrainer._precompute_ref_logps builds it once with `trl.models.prepare_deepspeed(self.model, self.accelerator)`
    and keeps it in `self._precompute_engine` (set to None in __init__ before the first precompute).
    """
    if trainer._precompute_engine is None:
        from trl.models import prepare_deepspeed

        trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
    return trainer._precompute_engine


# -- metrics (DPOTrainer._compute_loss, DPOTrainer.log) ----------------------------------------------------------------

#: The reward metrics DPOTrainer._compute_loss appends once per call.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def metrics_mode(trainer) -> str:
    """'train' or 'eval', chosen as DPOTrainer._compute_loss and DPOTrainer.log choose it (`model.training`)."""
    return "train" if trainer.model.training else "eval"


def metric_lists(trainer, mode: str) -> dict[str, list[float]]:
    """DPOTrainer's `self._metrics[mode]`: metric name -> values appended since the last log, averaged by `log`."""
    return trainer._metrics[mode]


# -- checkpoints (transformers Trainer._save_checkpoint, Trainer._get_output_dir) --------------------------------------


def checkpoint_folder(trainer, trial) -> str:
    """The folder `Trainer._save_checkpoint(model, trial)` is about to write: `<run dir>/checkpoint-<global_step>`."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def get_last_checkpoint(output_dir: str) -> str | None:
    """`transformers.trainer_utils.get_last_checkpoint`: the `checkpoint-<step>` folder with the highest step."""
    from transformers.trainer_utils import get_last_checkpoint as last

    return last(output_dir)


# -- model card and Hub (DPOTrainer.__init__, DPOTrainer._save_checkpoint, Trainer.push_to_hub, Trainer.save_model) -----


def card_attributes(*, tags: list[str], name: str, paper: dict[str, str]) -> tuple[list[str], str, dict[str, str]]:
    """Values for a trainer's class attributes `_tag_names, _name, _paper`, TRL's names for what a card shows.

    DPOTrainer.__init__ adds `_tag_names` to the model's tags (`model.add_model_tags`), which `push_to_hub` puts on
    the card; `trl_cpo.model_card` reads all three. `paper` holds "title", "id" (arXiv id) and "citation" (BibTeX). Use
    as `_tag_names, _name, _paper = card_attributes(tags=[...], name="...", paper={...})` in a trainer's class body.
    """
    return list(tags), name, dict(paper)


def dpo_paper() -> dict[str, str]:
    """DPOTrainer's `_paper` class attribute: the DPO paper's "title", "id" and "citation" (for the DPO baseline)."""
    from trl import DPOTrainer

    return dict(DPOTrainer._paper)


def get_config_model_id(config) -> str:
    """`trl.trainer.utils.get_config_model_id(config)`: the model's name or path (`config._name_or_path`)."""
    from trl.trainer.utils import get_config_model_id as model_id

    return model_id(config)


#: The lines of TRL's model card (`trl/templates/lm_model_card.md`, rendered by `DPOTrainer.create_model_card`) that
#: `trl_cpo.model_card.extend_model_card` replaces or writes next to: the opening that names the base model and data,
#: the quick start's model id (`hub_model_id`, "None" before a push names one), the framework versions' heading, the
#: line before TRL's citation, and the metadata key TRL misspells (`licence: license`).
TRL_CARD_OPENING = re.compile(
    r"^This model is a fine-tuned version of .*\n^It has been trained using \[TRL\]\(https://github\.com/huggingface/trl\)\.\n",
    re.MULTILINE,
)
TRL_CARD_QUICK_START_MODEL = 'model="{}"'
TRL_CARD_FRAMEWORK_VERSIONS = "### Framework versions\n\n"
TRL_CARD_TRL_CITATION = "Cite TRL as:"
TRL_CARD_BOGUS_LICENSE_KEY = "licence"


def save_model_without_push(trainer, output_dir: str | None = None) -> None:
    """`Trainer.save_model(output_dir, _internal_call=True)`: save (gathering sharded weights) without the push that
    `save_model` otherwise makes when `args.push_to_hub` is set."""
    trainer.save_model(output_dir, _internal_call=True)


#: What `Trainer.push_to_hub` passes to `upload_folder` as `ignore_patterns` (transformers trainer.py,
#: `Trainer.push_to_hub`: `["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]`); huggingface_hub adds its own defaults.
PUSH_IGNORE_PATTERNS = ("_*", "checkpoint-*")


def ignore_in_ddp(model, names: list[str]) -> None:
    """Make DistributedDataParallel skip these parameters / buffers (it reads `module._ddp_params_and_buffers_to_ignore`
    when it wraps the model): booleans (e.g. causal masks of some architectures) cannot be broadcast."""
    model._ddp_params_and_buffers_to_ignore = list(names)


# -- evaluation metrics (transformers Trainer.evaluate, trainer_utils.speed_metrics) -----------------------------------


def metric_prefix(metrics: dict) -> str:
    """The `metric_key_prefix` of an evaluation's metrics: "eval", or "eval_<name>" for a dict of eval sets.

    `Trainer.evaluate` always adds `<prefix>_runtime` (`speed_metrics`).
    """
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def prepare_inputs(trainer, batch: dict) -> dict:
    """`Trainer._prepare_inputs(batch)`: the batch moved to the trainer's device."""
    return trainer._prepare_inputs(batch)


# -- runtime check -----------------------------------------------------------------------------------------------------

#: DPOTrainer methods trl_cpo overrides or calls, with the parameters it passes (an override of a method TRL renamed
#: would silently never run).
DPO_METHODS = {
    PRECOMPUTE_METHOD: ("dataset", "name", "batch_size"),
    "_prepare_dataset": ("dataset", "processing_class", "args", "dataset_name"),
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "compute_ref_log_probs": ("model", "inputs"),
    "create_model_card": ("model_name", "dataset_name", "tags"),
}
#: The assumption each of those methods belongs to.
METHOD_ASSUMPTIONS = {
    PRECOMPUTE_METHOD: "precompute_hook",
    "_prepare_dataset": "prepare_dataset",
    "_save_checkpoint": "save_checkpoint",
    "_get_output_dir": "save_checkpoint",
    "compute_ref_log_probs": "compute_ref_log_probs",
    "create_model_card": "model_card",
}


def check_dpo_trainer(cls=None) -> None:
    """Raise `RuntimeError` with the broken assumption if DPOTrainer lacks a method trl_cpo overrides or calls."""
    if cls is None:
        from trl import DPOTrainer as cls
    for name, params in DPO_METHODS.items():
        method = getattr(cls, name, None)
        found = () if method is None else tuple(inspect.signature(method).parameters)[1:]
        if method is None or found[: len(params)] != params:
            detail = f"{cls.__name__}.{name}{'' if method is None else found} is not {name}{params}"
            raise RuntimeError(ASSUMPTIONS[METHOD_ASSUMPTIONS[name]].broken(detail))


@contextlib.contextmanager
def disable_gradient_checkpointing(model, gradient_checkpointing_kwargs: dict | None = None) -> Iterator[None]:
    """`trl.models.utils.disable_gradient_checkpointing`: gradient checkpointing off inside the block, back on after."""
    from trl.models.utils import disable_gradient_checkpointing as disabled

    with disabled(model, gradient_checkpointing_kwargs):
        yield


def preference_collator_class() -> type:
    """`trl.trainer.dpo_trainer.DataCollatorForPreference`, the collator DPOTrainer uses for text data."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference


@contextlib.contextmanager
def contract(key: str) -> Iterator[Assumption]:
    """Re-raise any failure inside the block as an `AssertionError` carrying assumption `key`'s broken() message."""
    assumption = ASSUMPTIONS[key]
    try:
        yield assumption
    except Exception as error:  # noqa: BLE001 - a missing name, a wrong value or a crash all break the contract
        raise AssertionError(assumption.broken(f"{type(error).__name__}: {error}")) from error
