"""Held-out measurements of `trl-cpo demo`: preference accuracy, U-fraction and log-odds on pairs no row trains on."""

from __future__ import annotations

from collections.abc import Sequence


def mean_or_none(values) -> float | None:
    """The mean of a tensor, rounded for results.json; None for an empty one."""
    return round(values.float().mean().item(), 6) if values.numel() else None


def held_out_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> dict[str, float | None]:
    """Preference (ranking) accuracy, DPO's reward accuracy, U-fraction and mean policy log-odds on held-out pairs
    (inputs in the loss's space).

    The ``*_ref_misaligned`` entries restrict to the pairs the reference gets wrong (``delta_ref < 0``), the only ones
    that can lie in U; they are ``None`` when there are none.
    """
    from trl_cpo.metrics import in_undesirable_space, u_fraction

    delta_pi = policy_chosen - policy_rejected
    misaligned = (ref_chosen - ref_rejected) < 0
    in_u = in_undesirable_space(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return {
        "accuracy": mean_or_none(delta_pi > 0),
        # DPO's reward accuracy, in the loss's space: the policy beats the reference's log-odds (a pair in U counts as
        # right here). TRL's rewards/accuracies makes the same comparison on summed log-probs.
        "reward_accuracy": mean_or_none(delta_pi > ref_chosen - ref_rejected),
        "u_fraction": round(u_fraction(policy_chosen, policy_rejected, ref_chosen, ref_rejected).item(), 6),
        "accuracy_ref_misaligned": mean_or_none(delta_pi[misaligned] > 0),
        "u_fraction_ref_misaligned": mean_or_none(in_u[misaligned]),
        "mean_delta_pi": mean_or_none(delta_pi),
        "mean_delta_pi_ref_misaligned": mean_or_none(delta_pi[misaligned]),
    }


class HeldOut:
    """Held-out pairs, tokenized once, and the reference's log-probs on them.

    `reference` keeps the summed log-probs and lengths (a `trl_cpo.reference.ReferenceLogps`, what the method targets
    are computed from); `ref_chosen` / `ref_rejected` are the per-token values the measurements use.
    """

    def __init__(self, tokenizer, pairs: Sequence[dict], reference):
        from trl_cpo.reference import ReferenceLogps

        from . import task as task_lib

        self._task = task_lib
        self.pad_token_id = tokenizer.pad_token_id
        self.chosen = [task_lib.encode(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
        self.rejected = [task_lib.encode(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
        self.reference = ReferenceLogps(*self._summed(reference))
        self.ref_chosen, self.ref_rejected = self.reference.per_token()

    def _summed(self, model):
        chosen, chosen_len = self._task.completion_logps(model, self.chosen, self.pad_token_id)
        rejected, rejected_len = self._task.completion_logps(model, self.rejected, self.pad_token_id)
        return chosen, rejected, chosen_len, rejected_len

    def logps(self, model):
        from trl_cpo.logps import to_loss_space

        return to_loss_space(*self._summed(model), length_normalized=True)

    def measure(self, model) -> dict[str, float | None]:
        return held_out_metrics(*self.logps(model), self.ref_chosen, self.ref_rejected)

    @property
    def misaligned(self):
        return self.ref_chosen < self.ref_rejected
