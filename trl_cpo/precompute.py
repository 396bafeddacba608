"""The reference precompute of CPOTrainer / ECPOCTrainer: run when first needed, after the resume target is known.

DPOTrainer precomputes the reference log-probs of the train set and every eval set in its constructor. Here that call
(`_precompute_ref_logps`, same call sites) only records what is to be computed; `precompute_reference()` computes it:

- at the start of `train()`, after the resume target is known, so everything that can refuse a resume is checked
  first from the checkpoint's metadata and the tokenized pairs' digests (no forward), and a checkpoint holding a valid
  reference for these pairs is used as is (`trl_cpo.checkpoints.prepare_resume`): no reference pass on resume;
- at the start of `evaluate()` / `predict()` (the eval sets), and on first read of `train_reference_logps`,
  `eval_reference_logps` or `reference_report`.

Every dataset given at construction is scored while the policy is still the reference (before the first training
step), as DPOTrainer does; a dataset passed to `evaluate()` later is computed at once, under DPOTrainer's rules. Each
set is looked up in the reference store before computing (`trl_cpo.reference_store`), and stored after.
"""

from __future__ import annotations

import logging

import torch
from datasets import IterableDataset

from . import _trl_compat
from .data import pair_digests
from .fingerprint import model_digests, reference_fingerprint
from .quantization import keep_4bit_layers_trainable
from .reference import ReferenceLogps, compute_reference_logps, with_columns
from .reference_store import ReferenceStore, load_matching_reference_logps
from .report import ReferenceReport
from .report_callback import announce_report

logger = logging.getLogger(__name__)

#: Key of the train set in `_pending` (eval sets are keyed ("eval", name): an eval set may be named "train").
TRAIN = ("train", "train")


def reference_weights(trainer) -> str | None:
    """The weights digest of the model the precompute reads (a ref_model, else the policy before any step; a PEFT
    model counts as its base): what a resume compares, without a forward."""
    return model_digests(trainer.ref_model or trainer.model)[1]


class ReferencePrecompute:
    """Mixin for a `trl.DPOTrainer` subclass: the deferred, stored reference precompute described above."""

    def _init_precompute(self) -> None:
        # Before DPOTrainer.__init__, which calls `_precompute_ref_logps` for each dataset.
        self._deferring = True
        self._pending: dict[tuple[str, str], int] = {}
        self._train_reference_logps: ReferenceLogps | None = None
        self._eval_reference_logps: dict[str, ReferenceLogps] = {}
        self._reference_report: ReferenceReport | None = None
        #: Digest of the reference weights the train set's log-probs came from (`trl_cpo.fingerprint.model_digests`),
        #: stored with checkpoints so a resume can tell, without a forward, that it was given another model.
        self.reference_weights: str | None = None

    # -- what users read: filled when first needed ----------------------------------------------------------------

    @property
    def train_reference_logps(self) -> ReferenceLogps | None:
        """The train set's reference log-probs (None with a live reference); computed on first read if pending."""
        self._precompute_if_pending(TRAIN)
        return self._train_reference_logps

    @train_reference_logps.setter
    def train_reference_logps(self, value: ReferenceLogps | None) -> None:
        self._train_reference_logps = value

    @property
    def eval_reference_logps(self) -> dict[str, ReferenceLogps]:
        """Each eval set's reference log-probs, by DPOTrainer's name ("eval", or the eval dict's keys)."""
        self._precompute_if_pending(*[key for key in self._pending if key != TRAIN])
        return self._eval_reference_logps

    @property
    def reference_report(self) -> ReferenceReport | None:
        """What the reference says about the train set (`trl_cpo.report`): from the precompute, or, with a live
        reference, over the train pairs seen so far (refreshed at each log)."""
        self._precompute_if_pending(TRAIN)
        return self._reference_report

    @reference_report.setter
    def reference_report(self, value: ReferenceReport | None) -> None:
        self._reference_report = value

    def _precompute_if_pending(self, *keys) -> None:
        if not getattr(self, "_deferring", True) and any(key in self._pending for key in keys):
            self.precompute_reference(*keys)

    # -- computing --------------------------------------------------------------------------------------------------

    def precompute_reference(self, *keys) -> None:
        """Compute the pending reference log-probs now (all of them, or the `keys` of `_pending`), e.g. to get the
        reference report before `train()`. A no-op when nothing is pending."""
        for key in [key for key in self._pending if not keys or key in keys]:
            batch_size = self._pending.pop(key)
            kind, name = key
            if kind == "train":
                self.train_dataset = self._compute_split(self.train_dataset, name, batch_size, is_train=True)
            elif isinstance(self.eval_dataset, dict):
                prepared = self._compute_split(self.eval_dataset[name], name, batch_size, is_train=False)
                self.eval_dataset = {**self.eval_dataset, name: prepared}
            else:
                self.eval_dataset = self._compute_split(self.eval_dataset, name, batch_size, is_train=False)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # DPOTrainer's hook (same call sites: __init__ for the train set then each eval set, and `evaluate` for the
        # datasets passed to it). In __init__ it only records the dataset; later it computes at once.
        if isinstance(dataset, IterableDataset):
            return self._streamed_eval_set(dataset, name, batch_size)
        is_train = dataset is self.train_dataset
        # Deferred, except the audit's file (`reference_logps_file`): reading and checking it runs no forward, and a
        # file from other inputs is refused at once.
        if self._deferring and not (is_train and self.args.reference_logps_file):
            self._pending[TRAIN if is_train else ("eval", name)] = batch_size
            return dataset
        return self._compute_split(dataset, name, batch_size, is_train=is_train)

    def _streamed_eval_set(self, dataset, name: str, batch_size: int):
        if self._precompute_asked:  # an explicit precompute_ref_log_probs=True: fail in TRL's own words
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # A streamed set passed to `evaluate()` when the data let the run precompute: scored with the live reference,
        # which exists while the policy is still the reference, or as a ref_model or PEFT base.
        if self.state.global_step > 0 and self.ref_model is None and not _trl_compat.is_peft(self.model):
            raise ValueError(
                f"Cannot score the streamed eval set {name!r} against the reference after training started: with "
                "full fine-tuning and no ref_model, the reference is not kept once its log-probs are precomputed. "
                "Pass it as eval_dataset when building the trainer, pass a ref_model, or materialize it "
                "(`Dataset.from_generator`) so it is precomputed before training."
            )
        return dataset

    def _compute_split(self, dataset, name: str, batch_size: int, *, is_train: bool):
        # The precompute is an eval-mode, no-grad forward of the policy: keep bitsandbytes from repacking its 4-bit
        # layers into a CPU inference layout that cannot be trained afterwards.
        keep_4bit_layers_trainable(self.model)
        # A dataset that went through this step before (e.g. `evaluate(trainer.eval_dataset)`) is recomputed from
        # scratch: its old columns must not reach the reference forward.
        stale = [c for c in _trl_compat.REFERENCE_COLUMNS if c in dataset.column_names]
        dataset = dataset.remove_columns(stale) if stale else dataset
        row_digests = pair_digests(dataset)  # binds checkpoints (and the store's entries) to these exact pairs
        reference = self._stored_or_computed_reference(dataset, name, batch_size, row_digests, is_train)
        reference.row_digests = row_digests
        if is_train:
            self.reference_weights = reference_weights(self)
            self.set_train_reference(reference)
            announce_report(self, self._reference_report)
        else:
            self._eval_reference_logps[name] = reference
        return self._with_reference(dataset, reference)

    def set_train_reference(self, reference: ReferenceLogps, chosen_settings: bool = True) -> None:
        """Train against `reference`: the settings chosen from it (CPO's `cpo_auto_gamma`, unless restored from a
        checkpoint), its report, and the train set's reference columns."""
        self._pending.pop(TRAIN, None)
        self._train_reference_logps = reference
        if chosen_settings:
            self._choose_method_settings(reference)
        self._reference_report = self._report(reference)
        self.train_dataset = self._with_reference(self.train_dataset, reference)

    def set_eval_reference(self, name: str, reference: ReferenceLogps) -> None:
        """Evaluate eval set `name` against `reference` (a checkpoint's)."""
        self._pending.pop(("eval", name), None)
        self._eval_reference_logps[name] = reference
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {**self.eval_dataset, name: self._with_reference(self.eval_dataset[name], reference)}
        else:
            self.eval_dataset = self._with_reference(self.eval_dataset, reference)

    def _stored_or_computed_reference(self, dataset, name, batch_size, row_digests, is_train) -> ReferenceLogps:
        # The audit's file when `reference_logps_file` names it (refused, saying why, if it was computed on other
        # inputs); else the reference store's entry for this fingerprint; else one reference pass, then stored.
        if is_train and self.args.reference_logps_file:
            fingerprint = reference_fingerprint(self, dataset, row_digests)
            return load_matching_reference_logps(self.args.reference_logps_file, fingerprint)
        store = ReferenceStore(self.args.reference_cache_dir) if self.args.reference_cache else None
        fingerprint = reference_fingerprint(self, dataset, row_digests) if store is not None else None
        found = store.lookup(fingerprint) if store is not None else None
        # Every rank takes the same branch: the pass gathers over ranks.
        flag = torch.tensor([0.0 if found is None else 1.0], device=self.accelerator.device)
        if self.accelerator.gather(flag).min().item() == 1.0:
            self._say_where(f"read from the reference store ({store.path(fingerprint)}), no forward", name, found)
            return found
        reference = compute_reference_logps(
            self, dataset, batch_size=batch_size, desc=f"Computing reference log-probs for {name} dataset"
        )
        if store is not None and self.accelerator.is_main_process:
            try:
                self._say_where(f"computed, stored in {store.write(fingerprint, reference)}", name, reference)
            except OSError as error:  # the store only saves time: a folder that cannot be written costs a later pass
                logger.warning(
                    "Reference log-probs of %s computed but not stored (%s): training goes on, and the next run with "
                    "this reference and data computes them again. Fix: set reference_cache_dir (or the "
                    "TRL_CPO_REFERENCE_CACHE environment variable) to a writable folder, or reference_cache=False.",
                    name,
                    error,
                )
        elif store is None:
            self._say_where("computed (reference_cache=False: not stored)", name, reference)
        return reference

    def _say_where(self, what: str, name: str, reference: ReferenceLogps) -> None:
        # Printed like the reference report, so a wrong store hit cannot pass unseen at the default log level.
        if self.accelerator.is_main_process:
            print(f"Reference log-probs of {name} ({len(reference)} pairs): {what}.", flush=True)

    @staticmethod
    def _with_reference(dataset, reference: ReferenceLogps):
        # DPOTrainer's own columns: the margin is computed from them in the loss step.
        columns = {_trl_compat.REF_CHOSEN_LOGPS: reference.chosen, _trl_compat.REF_REJECTED_LOGPS: reference.rejected}
        return with_columns(dataset, columns)
