"""`CPOTrainer`: Constrained Preference Optimization (Yang et al., ICML 2026, arXiv:2605.20834) on TRL's DPOTrainer."""

from __future__ import annotations

import logging

from ._margin_trainer import _ReferenceMarginTrainer
from ._trl_compat import card_attributes
from .methods import METHODS
from .model_card import CITATION, PAPER_ID, PAPER_TITLE
from .reference import ReferenceLogps
from .report import recommend_cpo_gamma

logger = logging.getLogger(__name__)


class CPOTrainer(_ReferenceMarginTrainer):
    r"""Trainer for CPO, Constrained Preference Optimization (not TRL's Contrastive Preference Optimization).

    A drop-in replacement for [`~trl.DPOTrainer`] (same arguments; a plain `DPOConfig` is used as is, with the CPO
    fields at their defaults) whose loss is

        -log sigmoid(beta * (delta_pi - delta_ref) - m),   m = cpo_gamma * (1/pi_ref(y_w|x) + 1/pi_ref(y_l|x)),

    with `m` computed at each step from the batch's reference log-probs, on per-token reference probabilities (see
    `trl_cpo.losses.cpo_margin`): precomputed before training where the data allows it, else from DPOTrainer's live
    reference forward (`trl_cpo.reference_source`).
    Logs `u_fraction`, `ref_misaligned_fraction` and `cpo_margin` next to DPOTrainer's metrics.
    """

    method = METHODS["cpo"]

    _tag_names, _name, _paper = card_attributes(
        tags=["trl", "trl-cpo", "constrained-preference-optimization"],
        name="CPO (Constrained Preference Optimization)",
        paper={"title": PAPER_TITLE, "id": PAPER_ID, "citation": CITATION},
    )

    def _check_live_reference(self, args) -> None:
        if args.cpo_auto_gamma is not None:
            raise ValueError(
                f"cpo_auto_gamma={args.cpo_auto_gamma} needs the whole train set's reference log-probs before training, "
                "but this run's reference is live (precompute_ref_log_probs=False, or the data cannot be precomputed: "
                "an IterableDataset, vision data or sync_ref_model=True). Set cpo_gamma yourself (`trl-cpo audit` on "
                "a map-style sample of the data recommends one) and unset cpo_auto_gamma, or give map-style text data."
            )

    def _choose_method_settings(self, reference: ReferenceLogps) -> None:
        share = self.args.cpo_auto_gamma
        if share is None:
            return
        recommendation = recommend_cpo_gamma(
            reference.chosen,
            reference.rejected,
            reference.chosen_lengths,
            reference.rejected_lengths,
            beta=self.args.beta,
            length_normalized=self.length_normalized,
            share=share,
            margin_type=self.args.cpo_margin_type,
            max_margin=self.args.cpo_max_margin,
        )
        if recommendation.gamma is None:
            raise ValueError(f"cpo_auto_gamma={share} cannot be met on this train set: {recommendation.reason}")
        logger.warning(
            "cpo_auto_gamma=%s: cpo_gamma set to %.4g from the train set's reference (was %s). %s",
            share,
            recommendation.gamma,
            self.args.cpo_gamma,
            recommendation.reason,
        )
        self.args.cpo_gamma = recommendation.gamma

    def _margin_settings(self) -> dict[str, object]:
        settings = {**super()._margin_settings(), "cpo_auto_gamma": self.args.cpo_auto_gamma}
        if self.args.cpo_auto_gamma is not None:
            # cpo_gamma was chosen from the data, and a resumed run takes the checkpoint's back: compare the share.
            del settings["cpo_gamma"]
        return settings

    def _restore_chosen_settings(self, saved_settings: dict, checkpoint: str) -> None:
        # A cpo_gamma chosen by cpo_auto_gamma is part of the run: a resumed run keeps the checkpoint's value rather
        # than re-choosing it from a reference that may have been rebuilt slightly differently.
        saved = saved_settings.get("cpo_gamma")
        if self.args.cpo_auto_gamma is not None and saved is not None and saved != self.args.cpo_gamma:
            logger.warning("Resuming with the checkpoint's cpo_gamma=%.6g (chosen by cpo_auto_gamma).", saved)
            self.args.cpo_gamma = float(saved)
