r"""The audit's own numbers, beyond the trainers' reference report: pure functions of per-pair reference log-probs.

- both log-prob spaces side by side (summed and per-token averaged), with the sign-agreement cross-tab: a pair can be
  misaligned in one space and not in the other, because ``delta_ref`` per token is ``c / n_w - r / n_l`` while the
  summed one is ``c - r``;
- the misaligned fraction per completion-length bucket;
- how often the reference is *confident* on the pairs it gets "wrong" (where a flipped label is the other
  explanation);
- what CPO, E-CPOC and HyPO do to the misaligned pairs at given settings (the share they lift to a target ``>= 0``: their
  entries' `effects` in `trl_cpo.methods`, which the reference report prints too);
- the verdict: :func:`recommend`.

The thresholds below are rules of thumb chosen for this tool, not values from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_cpo.logps import is_length_normalized
from trl_cpo.methods import METHODS, Pairs
from trl_cpo.report import QUANTILES, wilson_interval

#: The methods the verdict chooses between, by their entries: their `effects` are the numbers it reads.
CPO, ECPOC, HYPO = METHODS["cpo"], METHODS["ecpoc"], METHODS["hypo"]

#: Verdict "no preference signal" when every pair's |delta_ref| (in the loss's space) is at most this: the reference
#: cannot tell chosen from rejected on any pair (identical responses, or a model that scores both alike), so there is
#: nothing to recommend a method on (`trl_cpo.metrics.U_FRACTION_ATOL`, the trainers' round-off tolerance).
NO_SIGNAL_ATOL = 1e-4
#: Among the pairs the reference gets right (delta_ref >= 0), the share whose target E-CPOC's floor (at the
#: ecpoc_gamma in effect) would raise, above which the verdict prefers HyPO, whose floor is 0: it changes the target of
#: the misaligned pairs only.
MAX_ALIGNED_FLOOR_FRACTION = 0.25
#: Verdict "DPO is fine" when the upper end of the 95% Wilson interval of the misaligned fraction is at most this:
#: then DPO's assumption holds on at least 95% of pairs, with 95% confidence (a small sample with no misaligned pair
#: does not qualify by luck).
DPO_FINE_MAX_MISALIGNED = 0.05
#: Share of margins at `cpo_max_margin` above which CPO is "DPO plus a constant" on most pairs (`cpo_gamma` no longer
#: matters there), so a cpo_gamma that needs it is not recommended.
MAX_AT_CAP_FRACTION = 0.5
#: A misaligned pair is one where the reference is *confident* if its |delta_ref| (in the loss's space) is at or
#: above this quantile of |delta_ref| over all pairs: the reference is as sure as on its surest quarter of pairs.
CONFIDENT_QUANTILE = 0.75
#: If confidence and misalignment were unrelated, about 1 - CONFIDENT_QUANTILE (25%) of misaligned pairs would be
#: confident. The caveat asks to read those pairs first when even the low end of the 95% Wilson interval of that share
#: is above 25%: the reference is confident on its "errors" more often than chance, which is how flipped labels look.
#: Number of completion-length buckets (quantile buckets of the pair's mean completion length).
LENGTH_BUCKETS = 4
#: Sign labels of the cross-tab.
SIGNS = ("negative", "zero", "positive")
#: Verdict branches, in the order `recommend` tries them.
BRANCHES = ("no_signal", "dpo_fine", "cpo_as_configured", "cpo_recommended_gamma", "use_hypo", "use_ecpoc")


def _share(mask: torch.Tensor) -> float:
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def space_summary(delta_ref: torch.Tensor) -> dict[str, object]:
    """Misaligned fraction (``delta_ref < 0``) with its 95% Wilson interval, tie share and quantiles of one space."""
    n = delta_ref.numel()
    misaligned = int((delta_ref < 0).sum())
    low, high = wilson_interval(misaligned, n)
    quantiles = torch.quantile(delta_ref.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {
        "misaligned_fraction": misaligned / n,
        "misaligned_fraction_ci_low": low,
        "misaligned_fraction_ci_high": high,
        "num_misaligned": misaligned,
        "tie_fraction": _share(delta_ref == 0),
        "delta_ref_quantiles": {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, quantiles)},
    }


def _sign(values: torch.Tensor) -> torch.Tensor:
    return torch.sign(values).long() + 1  # 0 negative, 1 zero, 2 positive: indexes SIGNS


def sign_crosstab(delta_summed: torch.Tensor, delta_per_token: torch.Tensor) -> dict[str, dict[str, int]]:
    """Pair counts by the sign of ``delta_ref`` in each space: ``{"summed_<sign>": {"per_token_<sign>": count}}``."""
    rows, columns = _sign(delta_summed), _sign(delta_per_token)
    return {
        f"summed_{row_sign}": {
            f"per_token_{column_sign}": int(((rows == i) & (columns == j)).sum())
            for j, column_sign in enumerate(SIGNS)
        }
        for i, row_sign in enumerate(SIGNS)
    }


def sign_disagreement(delta_summed: torch.Tensor, delta_per_token: torch.Tensor) -> dict[str, float]:
    """Shares of pairs whose sign differs between the spaces (a tie on one side counts as different), and of pairs
    misaligned in exactly one space."""
    return {
        "sign_differs_fraction": _share(_sign(delta_summed) != _sign(delta_per_token)),
        "misaligned_in_one_space_fraction": _share((delta_summed < 0) ^ (delta_per_token < 0)),
    }


def length_buckets(
    delta_summed: torch.Tensor,
    delta_per_token: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    num_buckets: int = LENGTH_BUCKETS,
) -> list[dict[str, object]]:
    """Misaligned fraction (both spaces, with Wilson intervals) per bucket of the pair's mean completion length.

    Buckets are quantile buckets (about ``n / num_buckets`` pairs each; fewer buckets when lengths tie), closed on the
    right: ``[min, e1], (e1, e2], ...``. Lengths are completion token counts as TRL counts them (eos included).
    """
    length = (chosen_lengths.double() + rejected_lengths.double()) / 2
    probs = torch.linspace(0, 1, num_buckets + 1, dtype=torch.float64)
    # 'lower': every edge is a length some pair has, so buckets read as token counts.
    edges = sorted(set(torch.quantile(length, probs, interpolation="lower").tolist()))
    if len(edges) == 1:
        edges = edges * 2
    buckets = []
    for index, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (length <= high) & ((length >= low) if index == 0 else (length > low))
        n = int(inside.sum())
        if n == 0:
            continue
        bucket: dict[str, object] = {"min_tokens": low, "max_tokens": high, "num_pairs": n}
        for space, delta in (("summed", delta_summed), ("per_token", delta_per_token)):
            k = int((delta[inside] < 0).sum())
            ci_low, ci_high = wilson_interval(k, n)
            bucket[f"misaligned_fraction_{space}"] = k / n
            bucket[f"misaligned_fraction_{space}_ci_low"] = ci_low
            bucket[f"misaligned_fraction_{space}_ci_high"] = ci_high
        buckets.append(bucket)
    return buckets


def confident_misaligned(delta_ref: torch.Tensor, quantile: float = CONFIDENT_QUANTILE) -> tuple[dict, torch.Tensor]:
    """How many misaligned pairs the reference is confident about (``|delta_ref|`` at or above the `quantile` of
    all pairs' ``|delta_ref|``).

    Returns the summary and the per-pair mask (misaligned and confident).
    """
    threshold = float(torch.quantile(delta_ref.abs().double(), quantile))
    misaligned = delta_ref < 0
    mask = misaligned & (delta_ref.abs().double() >= threshold)
    n_misaligned = int(misaligned.sum())
    return {
        "quantile": quantile,
        "threshold": threshold,
        "num_misaligned_confident": int(mask.sum()),
        "misaligned_confident_fraction": int(mask.sum()) / n_misaligned if n_misaligned else 0.0,
        "misaligned_confident_fraction_ci_low": wilson_interval(int(mask.sum()), n_misaligned)[0],
        # Under no link between confidence and misalignment, this share is about 1 - quantile.
        "expected_if_unrelated": 1 - quantile,
    }, mask


@dataclass(frozen=True)
class Verdict:
    """What the numbers say to do. `branch` is one of `BRANCHES`."""

    branch: str
    text: str
    #: The mislabelled-pair caveat (empty when no pair is misaligned).
    caveat: str


def recommend(
    *,
    num_pairs: int,
    num_misaligned: int,
    misaligned_fraction: float,
    misaligned_fraction_ci_high: float,
    cpo: dict[str, float],
    cpo_at_recommended: dict[str, float] | None,
    recommended_cpo_gamma: float | None,
    recommended_reason: str,
    lift_share: float,
    ecpoc: dict[str, float],
    confident: dict[str, float],
    method: str,
    cpo_gamma_is_configured: bool,
    no_signal_fraction: float = 0.0,
    aligned_floor_fraction: float = 0.0,
) -> Verdict:
    r"""The verdict, from the numbers, in this order:

    0. ``no_signal``: every pair has ``|delta_ref| <= NO_SIGNAL_ATOL`` (`no_signal_fraction` 1): the reference
       prefers neither response anywhere (e.g. identical chosen and rejected), so no method is recommended.
    1. ``dpo_fine``: the 95% upper bound of the misaligned fraction is at most `DPO_FINE_MAX_MISALIGNED` (5%).
    2. ``cpo_as_configured``: CPO at the cpo_gamma in effect (the config's for CPO, else CPOConfig's default) lifts at
       least `lift_share` of the misaligned pairs with at most `MAX_AT_CAP_FRACTION` of margins at the cap.
    3. ``cpo_recommended_gamma``: `recommend_cpo_gamma` found a cpo_gamma lifting `lift_share`, and at that gamma at
       most `MAX_AT_CAP_FRACTION` of margins sit at the cap.
    4. a floor on the target (the cap leaves too few pairs reachable, `inverse_logp` margins lower the target, or the
       gamma that lifts enough puts most margins at the cap), which lifts every misaligned pair whatever the
       reference's confidence: ``use_hypo`` (target ``max(delta_ref, 0)``) when E-CPOC's floor at the configured
       ecpoc_gamma would also raise the target of more than `MAX_ALIGNED_FLOOR_FRACTION` of the pairs the reference
       gets right (`aligned_floor_fraction`), else ``use_ecpoc``.

    The caveat (whenever a pair is misaligned): ``delta_ref < 0`` can also mean a mislabelled pair, most of all where
    the reference is confident (see `confident_misaligned`).
    """
    pct = f"{misaligned_fraction:.1%}"
    where = f"the {num_misaligned} misaligned pairs" if num_misaligned != 1 else "the 1 misaligned pair"
    gamma_source = "the configured" if cpo_gamma_is_configured else "CPOConfig's default"
    lift, cap = cpo["lifted_fraction"], cpo["margin_at_cap_fraction"]
    if num_pairs and no_signal_fraction >= 1.0:
        return Verdict(
            "no_signal",
            f"No preference signal: on all {num_pairs} pairs the reference scores the chosen and the rejected response "
            f"alike (|delta_ref| <= {NO_SIGNAL_ATOL:g} in the loss's space; e.g. identical responses). No method can "
            "be recommended from this reference: check that chosen and rejected differ, and that the columns and the "
            "model are the intended ones.",
            "",
        )
    if misaligned_fraction_ci_high <= DPO_FINE_MAX_MISALIGNED:
        branch = "dpo_fine"
        text = (
            f"DPO is fine: the reference prefers the rejected response on {pct} of the {num_pairs} pairs (95% CI up to "
            f"{misaligned_fraction_ci_high:.1%}, at most {DPO_FINE_MAX_MISALIGNED:.0%}), so DPO's assumption holds on "
            "nearly all of this data; CPO or E-CPOC would change little."
        )
    elif lift >= lift_share and cap <= MAX_AT_CAP_FRACTION:
        branch = "cpo_as_configured"
        text = (
            f"CPO at {gamma_source} cpo_gamma={cpo['cpo_gamma']:.4g} lifts {lift:.0%} of {where} ({pct} of pairs) to "
            f"a target >= 0, with {cap:.0%} of margins at cpo_max_margin: "
            + ("train CPO as configured." if method == CPO.name else "CPOTrainer at that setting does the job.")
        )
    elif (
        recommended_cpo_gamma is not None
        and cpo_at_recommended is not None
        and cpo_at_recommended["margin_at_cap_fraction"] <= MAX_AT_CAP_FRACTION
    ):
        branch = "cpo_recommended_gamma"
        # Configured CPO falls short by lifting too few pairs, or by lifting them with margins at the cap.
        shortfall = (
            f"lifts only {lift:.0%} of {where} ({pct} of pairs)"
            if lift < lift_share
            else f"lifts {lift:.0%} of {where} ({pct} of pairs) but with {cap:.0%} of margins at cpo_max_margin, where "
            "CPO is DPO plus a constant"
        )
        text = (
            f"CPO at {gamma_source} cpo_gamma={cpo['cpo_gamma']:.4g} {shortfall}; cpo_gamma="
            f"{recommended_cpo_gamma:.4g} lifts {lift_share:.0%} of them, with "
            f"{cpo_at_recommended['margin_at_cap_fraction']:.0%} of margins at cpo_max_margin: set "
            f"cpo_gamma={recommended_cpo_gamma:.4g} (or cpo_auto_gamma={lift_share:g})."
        )
    else:
        branch = "use_hypo" if aligned_floor_fraction > MAX_ALIGNED_FLOOR_FRACTION else "use_ecpoc"
        if recommended_cpo_gamma is None:
            why = recommended_reason
        else:
            why = (
                f"cpo_gamma={recommended_cpo_gamma:.4g} would lift {lift_share:.0%} of {where}, but "
                f"{cpo_at_recommended['margin_at_cap_fraction']:.0%} of margins would then sit at cpo_max_margin, "
                "where CPO is DPO plus a constant."
            )
        start = (
            f"CPO at {gamma_source} cpo_gamma={cpo['cpo_gamma']:.4g} lifts {lift:.0%} of {where} ({pct} of pairs), and "
            f"no cpo_gamma does the job: {why.rstrip('.')}."
        )
        floor = f"E-CPOC's floor at ecpoc_gamma={ecpoc['ecpoc_gamma']:g}"
        if branch == "use_hypo":
            text = (
                f"Use HyPO (--method hypo, HyPOTrainer{', as configured' if method == HYPO.name else ''}): {start} "
                "HyPO's target max(delta_ref, 0) (E-CPOC's hard limit at ecpoc_gamma=0) lifts every one of them to 0 "
                f"and leaves DPO's target on the pairs the reference gets right, where {floor} would also raise "
                f"{aligned_floor_fraction:.0%} of the targets."
            )
        else:
            text = (
                f"Use E-CPOC: {start} E-CPOC floors the target at ecpoc_gamma (for ecpoc_alpha <= 1), whatever the "
                f"reference's confidence: at ecpoc_gamma={ecpoc['ecpoc_gamma']:g} it lifts "
                f"{ecpoc['lifted_fraction']:.0%} of them (ECPOCTrainer{', as configured' if method == ECPOC.name else ''}"
                f"). HyPO (--method hypo) is the same with the floor at 0; here {floor} raises only "
                f"{aligned_floor_fraction:.0%} of the targets of the pairs the reference gets right."
            )
    caveat = ""
    if num_misaligned:
        share = confident["misaligned_confident_fraction"]
        caveat = (
            "delta_ref < 0 can also mean a mislabelled pair (the reference right, the label wrong); lifting such a "
            f"pair trains toward the worse response. The reference is confident (|delta_ref| >= "
            f"{confident['threshold']:.3g}, the {confident['quantile']:.0%} quantile over all pairs) on {share:.0%} of "
            f"{where}"
        )
        if confident["misaligned_confident_fraction_ci_low"] > confident["expected_if_unrelated"]:
            caveat += (
                f", more than the {confident['expected_if_unrelated']:.0%} expected if confidence and misalignment "
                "were unrelated (even at the low end of its 95% CI): read those pairs (confident_misaligned in "
                "pairs.jsonl) before trusting their labels."
            )
        else:
            caveat += "; where it is, read those pairs (confident_misaligned in pairs.jsonl) before lifting them."
    return Verdict(branch, text, caveat)


def analyze(reference, config, method: str, report) -> dict[str, object]:
    """Every audit number for `reference` (a `ReferenceLogps`) under the training `config` of `method` (its name in
    `trl_cpo.methods.METHODS`), given the trainers' `report` on the same inputs. Per-pair arrays are under
    "per_pair"."""
    length_normalized = is_length_normalized(config.loss_type)
    summed = reference.delta_ref(False)
    per_token = reference.delta_ref(True)
    delta = per_token if length_normalized else summed
    pairs = Pairs(delta, *reference.per_token())
    confident, confident_mask = confident_misaligned(delta)
    # Each compared method at `config`'s settings for it (its config class's defaults where `config` has none).
    cpo_fields, ecpoc_fields = CPO.settings(config), ECPOC.settings(config)
    cpo = CPO.effects_at(pairs, config.beta, cpo_fields)
    recommended = report.recommended_cpo_gamma
    cpo_at_recommended = (
        CPO.effects_at(pairs, config.beta, {**cpo_fields, "cpo_gamma": recommended})
        if recommended is not None
        else None
    )
    ecpoc = ECPOC.effects_at(pairs, config.beta, ecpoc_fields)
    hypo = HYPO.effects_at(pairs, config.beta, HYPO.pinned)  # its fixed settings, whatever the config's
    aligned = delta >= 0
    verdict = recommend(
        num_pairs=delta.numel(),
        num_misaligned=int((delta < 0).sum()),
        misaligned_fraction=report.misaligned_fraction,
        misaligned_fraction_ci_high=report.misaligned_fraction_ci_high,
        cpo=cpo,
        cpo_at_recommended=cpo_at_recommended,
        recommended_cpo_gamma=recommended,
        recommended_reason=report.recommendation,
        lift_share=report.lift_share,
        ecpoc=ecpoc,
        confident=confident,
        method=method,
        cpo_gamma_is_configured=hasattr(config, "cpo_gamma"),
        no_signal_fraction=_share(delta.abs() <= NO_SIGNAL_ATOL),
        aligned_floor_fraction=_share(delta[aligned] < ecpoc_fields["ecpoc_gamma"]),
    )
    return {
        "loss_space": "per_token" if length_normalized else "summed",
        "spaces": {"summed": space_summary(summed), "per_token": space_summary(per_token)},
        "sign_crosstab": sign_crosstab(summed, per_token),
        **sign_disagreement(summed, per_token),
        "length_buckets": length_buckets(summed, per_token, reference.chosen_lengths, reference.rejected_lengths),
        "confident": confident,
        "cpo": {**cpo_fields, **cpo},
        "cpo_at_recommended_gamma": cpo_at_recommended,
        "ecpoc": {**ecpoc_fields, **ecpoc},
        "hypo": {**HYPO.pinned, **hypo},
        "verdict": verdict,
        "per_pair": {
            "delta_ref_summed": summed,
            "delta_ref_per_token": per_token,
            "misaligned": delta < 0,
            "confident_misaligned": confident_mask,
            "target": METHODS[method].target_from_config(reference, config),
            "cpo_target": CPO.target_from_config(reference, config),
            "ecpoc_target": ECPOC.target_from_config(reference, config),
        },
    }
