r"""The reference report: what the frozen reference says about a dataset before the first training step.

CPO exists to lift the target of the pairs the reference gets wrong (``delta_ref < 0``) out of the undesirable space
U (arXiv:2605.20834, Def. 3.3); E-CPOC floors every target at ``ecpoc_gamma``. Whether a run does that on *your* data is
known from the reference log-probs alone, so the trainers compute this report at the end of the precompute (and the
audit computes the same one):

- ``misaligned_fraction``: share of pairs with ``delta_ref < 0``, with a 95% Wilson interval;
- ``delta_ref`` quantiles, in the loss's log-prob space;
- what the run's method does to the pairs, from its entry of `trl_cpo.methods.METHODS` (`Method.effects`, the fields
  its `report_keys` name, and its `report_warnings`):
  ``margin_at_cap_fraction`` (CPO): share of margins at ``cpo_max_margin``, where ``cpo_gamma`` no longer matters;
  ``lifted_fraction`` (CPO): share of misaligned pairs whose target ``delta_ref + m / beta`` is ``>= 0``;
  ``floor_binding_fraction`` (E-CPOC): share of pairs with ``delta_ref < ecpoc_gamma``, where the floor raises the
  target;
- ``recommended_cpo_gamma``: the smallest ``cpo_gamma`` that lifts a given share (default 0.9) of misaligned pairs
  (:func:`recommend_cpo_gamma`).

Everything here is a pure function of per-pair reference log-probs (summed over completion tokens, as TRL stores
them) and completion lengths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .logps import is_length_normalized, per_token, to_loss_space
from .losses import DEFAULT_MAX_MARGIN, MARGIN_TYPES

#: Two-sided 95% normal quantile used by the Wilson interval.
Z_95 = 1.959963984540054
#: Quantiles of delta_ref the report gives.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Default share of misaligned pairs `recommend_cpo_gamma` (and `cpo_auto_gamma`'s documentation) aims to lift.
DEFAULT_LIFT_SHARE = 0.9
#: `recommend_cpo_gamma` returns the k-th smallest per-pair gamma times (1 + this), so that float32 round-off in the
#: margin cannot leave the k-th pair a hair below zero. Far smaller than any gap the recommendation is read at.
_GAMMA_SAFETY = 1e-4


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    r"""Wilson score interval for a binomial proportion ``successes / total`` (95% by default).

    ``center = (p + z^2/2n) / (1 + z^2/n)``, ``half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)``. Unlike the normal
    interval it stays inside [0, 1] and is not degenerate at 0 or n successes. ``total = 0`` gives (0, 1).
    """
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"wilson_interval needs 0 <= successes <= total, got successes={successes}, total={total}.")
    if total == 0:
        return 0.0, 1.0
    p, n = successes / total, total
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class GammaRecommendation:
    """Result of :func:`recommend_cpo_gamma`."""

    #: The smallest cpo_gamma lifting `share` of the misaligned pairs, or None when no cpo_gamma can.
    gamma: float | None
    #: The share of misaligned pairs asked for.
    share: float
    #: Share of misaligned pairs that some cpo_gamma can lift (the rest need a margin above the cap).
    reachable_share: float
    #: Why `gamma` is what it is, in one sentence that names the fix when there is none.
    reason: str


def _lift_inputs(ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, length_normalized):
    chosen, rejected = to_loss_space(
        ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, length_normalized
    )
    return (
        chosen - rejected,
        per_token(ref_chosen_logps, chosen_lengths),
        per_token(ref_rejected_logps, rejected_lengths),
    )


def recommend_cpo_gamma(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    length_normalized: bool = True,
    share: float = DEFAULT_LIFT_SHARE,
    margin_type: str = "inverse_prob",
    max_margin: float = DEFAULT_MAX_MARGIN,
) -> GammaRecommendation:
    r"""The smallest ``cpo_gamma`` for which ``share`` of the misaligned pairs (``delta_ref < 0``) get a target
    ``delta_ref + m / beta >= 0``.

    Closed form per pair: with ``S = 1/pi_ref(y_w) + 1/pi_ref(y_l)`` on per-token reference probabilities, the margin
    is ``m = min(gamma * S, max_margin)``, so pair ``i`` is lifted iff ``-beta * delta_ref_i <= max_margin`` and
    ``gamma >= gamma_i = -beta * delta_ref_i / S_i``. The answer is the ``ceil(share * n)``-th smallest ``gamma_i``
    (times ``1 + 1e-4`` against float round-off). It is None, with the reason, when the cap leaves fewer than that many
    pairs reachable, or for ``margin_type='inverse_logp'``, whose margin is negative and lowers every target.
    ``delta_ref`` is taken in the loss's space (``length_normalized``); ``S`` always per token.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share={share!r} is invalid: it must be in (0, 1], e.g. 0.9.")
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type={margin_type!r} is unknown; use one of {list(MARGIN_TYPES)}.")
    delta_ref, chosen_tok, rejected_tok = _lift_inputs(
        ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, length_normalized
    )
    misaligned = delta_ref < 0
    n = int(misaligned.sum())
    if n == 0:
        return GammaRecommendation(0.0, share, 1.0, "No pair is misaligned (delta_ref < 0): DPO's assumption holds.")
    if margin_type == "inverse_logp":
        return GammaRecommendation(
            None,
            share,
            0.0,
            "cpo_margin_type='inverse_logp' gives negative margins, which lower the target: no cpo_gamma lifts a "
            "misaligned pair. Use cpo_margin_type='inverse_prob' or ECPOCTrainer.",
        )
    need = (-beta * delta_ref[misaligned]).double()
    log_sum = torch.logaddexp(-chosen_tok[misaligned].double(), -rejected_tok[misaligned].double())
    reachable = need <= max_margin
    reachable_share = float(reachable.double().mean())
    k = max(1, math.ceil(share * n - 1e-9))
    if int(reachable.sum()) < k:
        return GammaRecommendation(
            None,
            share,
            reachable_share,
            f"cpo_max_margin={max_margin:g} caps the margin: only {reachable_share:.1%} of the {n} misaligned pairs can "
            f"reach a non-negative target at any cpo_gamma (lifting {share:.0%} needs a margin of "
            f"{torch.quantile(need, share).item():.3g}). Raise cpo_max_margin, or use ECPOCTrainer.",
        )
    log_gammas = torch.log(need[reachable]) - log_sum[reachable]
    gamma = math.exp(torch.sort(log_gammas).values[k - 1].item()) * (1 + _GAMMA_SAFETY)
    return GammaRecommendation(
        gamma, share, reachable_share, f"cpo_gamma={gamma:.4g} lifts {share:.0%} of the {n} misaligned pairs."
    )


@dataclass
class ReferenceReport:
    """What the reference says about a dataset, for one method's settings. See the module docstring."""

    method: str
    num_pairs: int
    loss_space: str
    misaligned_fraction: float
    misaligned_fraction_ci_low: float
    misaligned_fraction_ci_high: float
    delta_ref_quantiles: dict[str, float]
    recommended_cpo_gamma: float | None
    recommendation: str
    lift_share: float
    cpo_gamma: float | None = None
    margin_at_cap_fraction: float | None = None
    lifted_fraction: float | None = None
    floor_binding_fraction: float | None = None
    #: Warnings that name the fix (see `warnings`), filled by `reference_report`.
    warnings: list[str] = field(default_factory=list)

    #: Keys logged by the trainers (with a "reference/" prefix) and written by the audit (without).
    LOGGED_KEYS = (
        "misaligned_fraction",
        "misaligned_fraction_ci_low",
        "misaligned_fraction_ci_high",
        "margin_at_cap_fraction",
        "lifted_fraction",
        "floor_binding_fraction",
        "recommended_cpo_gamma",
        "cpo_gamma",
    )

    def to_logs(self, prefix: str = "reference/") -> dict[str, float]:
        """The logged numbers under `prefix + name`; fields that do not apply (None) are left out."""
        values = {name: getattr(self, name) for name in self.LOGGED_KEYS}
        return {prefix + name: float(value) for name, value in values.items() if value is not None}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def format_table(self) -> str:
        """A short plain-text table for the terminal."""
        low, high = self.misaligned_fraction_ci_low, self.misaligned_fraction_ci_high
        rows = [
            ("pairs", f"{self.num_pairs}  ({self.loss_space} log-probs)"),
            ("misaligned (delta_ref < 0)", f"{self.misaligned_fraction:.1%}  (95% CI {low:.1%} - {high:.1%})"),
            (
                "delta_ref p5 / p50 / p95",
                " / ".join(f"{self.delta_ref_quantiles[q]:.3g}" for q in ("p5", "p50", "p95")),
            ),
        ]
        if self.cpo_gamma is not None:
            rows.append(("cpo_gamma", f"{self.cpo_gamma:.4g}"))
        if self.margin_at_cap_fraction is not None:
            rows.append(("margins at cpo_max_margin", f"{self.margin_at_cap_fraction:.1%}"))
        if self.lifted_fraction is not None:
            rows.append(("misaligned pairs lifted (target >= 0)", f"{self.lifted_fraction:.1%}"))
        if self.floor_binding_fraction is not None:
            rows.append(("pairs where the floor binds", f"{self.floor_binding_fraction:.1%}"))
        gamma = self.recommended_cpo_gamma
        rows.append((f"cpo_gamma lifting {self.lift_share:.0%}", "none" if gamma is None else f"{gamma:.4g}"))
        width = max(len(name) for name, _ in rows)
        lines = [f"Reference report ({self.method})", *(f"  {name:<{width}}  {value}" for name, value in rows)]
        if gamma is None:
            lines.append(f"  {self.recommendation}")
        return "\n".join(lines)


def reference_report(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    config,
    *,
    method=None,
    share: float = DEFAULT_LIFT_SHARE,
) -> ReferenceReport:
    """The reference report of `config`'s method (a `CPOConfig`, an `ECPOCConfig`, any config of
    `trl_cpo.methods.METHODS`, or a plain `DPOConfig`, reported as what CPO at its default `cpo_gamma` would do with
    that beta and loss_type).

    `method` is an entry of `trl_cpo.methods.METHODS` (default: `trl_cpo.methods.method_for_config(config)`). What
    the method does to the pairs (`Method.effects`, the fields of `Method.report_keys`) and its warnings come from its
    entry; the recommended `cpo_gamma` is CPO's, at `config`'s CPO settings (CPOConfig's defaults where it has none).
    """
    from .methods import METHODS, Pairs, method_for_config

    method = method_for_config(config) if method is None else method
    length_normalized = is_length_normalized(config.loss_type)
    pairs = Pairs(
        *_lift_inputs(ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, length_normalized)
    )
    delta_ref = pairs.delta_ref
    n = delta_ref.numel()
    if n == 0:
        raise ValueError("The reference report needs at least one pair; the dataset is empty.")
    n_misaligned = int((delta_ref < 0).sum())
    low, high = wilson_interval(n_misaligned, n)
    quantiles = torch.quantile(delta_ref.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    cpo_settings = METHODS["cpo"].settings(config)
    recommendation = recommend_cpo_gamma(
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=config.beta,
        length_normalized=length_normalized,
        share=share,
        margin_type=cpo_settings["cpo_margin_type"],
        max_margin=cpo_settings["cpo_max_margin"],
    )
    report = ReferenceReport(
        method=method.title,
        num_pairs=n,
        loss_space="per-token averaged" if length_normalized else "summed",
        misaligned_fraction=n_misaligned / n,
        misaligned_fraction_ci_low=low,
        misaligned_fraction_ci_high=high,
        delta_ref_quantiles={f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, quantiles.tolist())},
        recommended_cpo_gamma=recommendation.gamma,
        recommendation=recommendation.reason,
        lift_share=share,
    )
    settings = method.settings(config)
    effects = method.effects_at(pairs, config.beta, settings)
    for key in method.report_keys:
        setattr(report, key, effects[key])
    report.warnings = method.warnings_at(report, pairs, config.beta, settings)
    return report
