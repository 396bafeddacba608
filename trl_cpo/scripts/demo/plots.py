"""The figures of `trl-cpo demo`: held-out curves against step, and final numbers against the corruption ratio.

matplotlib is optional (`pip install 'trl-cpo[plots]'`): without it each function returns False and the demo writes its
table and JSON and says which extra draws the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .stats import t_interval

COLORS = {"DPO": "tab:red", "CPO": "tab:blue", "CPO-auto": "tab:purple", "CPO-inverse_logp": "tab:orange"}
COLORS.update({"E-CPOC": "tab:green", "HyPO": "tab:brown"})
#: Dashed / dotted where rows overlap (CPO and CPO-inverse_logp sit on DPO's curves at the released settings, HyPO near
#: E-CPOC's).
LINESTYLES = {"DPO": "-", "CPO": "--", "CPO-auto": "-", "CPO-inverse_logp": ":", "E-CPOC": "-", "HyPO": "--"}


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (the `[plots]` extra): the demo
    then writes its table and JSON and says which extra draws the figures."""
    from trl_cpo._plotting import require_matplotlib

    try:
        return require_matplotlib()
    except ImportError:
        return None


def _band(values_per_seed: list[list[float | None]]):
    """Mean and t-interval bounds, point by point, of several seeds' curves."""
    intervals = [t_interval(point) for point in zip(*values_per_seed)]
    mean = [i["mean"] if i else float("nan") for i in intervals]
    low = [i["low"] if i and i["low"] is not None else m for i, m in zip(intervals, mean)]
    high = [i["high"] if i and i["high"] is not None else m for i, m in zip(intervals, mean)]
    return mean, low, high


def plot_curves(entry: dict[str, Any], path: str) -> bool:
    """Held-out accuracy, U-fraction and mean delta_pi on the misaligned pairs against step: mean over seeds with its
    95% t-band; dotted lines: each row's predicted optimum. False if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    seeds = entry["seeds"]
    summary = entry["summary"]
    ref = summary["reference"]
    show_dpi = ref.get("mean_delta_ref_misaligned") is not None
    fig, axes = plt.subplots(1, 3 if show_dpi else 2, figsize=(14 if show_dpi else 9.5, 3.6), dpi=90)
    panels = [("accuracy", axes[0]), ("u_fraction", axes[1])]
    if show_dpi:
        panels.append(("mean_delta_pi_ref_misaligned", axes[2]))
    for name in summary["methods"]:
        steps = [h["step"] for h in seeds[0]["methods"][name]["history"]]
        style = {"color": COLORS.get(name), "ls": LINESTYLES.get(name, "-"), "lw": 1.8}
        for key, ax in panels:
            mean, low, high = _band([[h[key] for h in s["methods"][name]["history"]] for s in seeds])
            ax.plot(steps, mean, label=name, **style)
            ax.fill_between(steps, low, high, color=style["color"], alpha=0.15, lw=0)
        predicted = summary["methods"][name].get("predicted_mean_delta_pi_ref_misaligned")
        if show_dpi and predicted is not None:
            axes[2].axhline(predicted["mean"], color=style["color"], ls=":", lw=1.2)
    reference_line = axes[0].axhline(ref["accuracy"]["mean"], color="gray", ls="--", lw=1, label="reference")
    axes[0].legend(handles=[reference_line], fontsize=8, loc="lower right")
    rate_line = axes[1].axhline(ref["misaligned_rate"]["mean"], color="gray", ls=":", lw=1, label="ref. misaligned")
    axes[1].legend(handles=[rate_line], fontsize=8, loc="upper right")
    axes[0].set(title="held-out accuracy (delta_pi > 0)", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].set(title="held-out U-fraction (delta_ref < delta_pi < 0)", xlabel="step", ylim=(-0.02, 1.02))
    if show_dpi:
        ax = axes[2]
        delta_ref = ref["mean_delta_ref_misaligned"]["mean"]
        ax.axhspan(delta_ref, 0, color="tab:red", alpha=0.08, label="U (at mean delta_ref)")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(delta_ref, color="gray", ls="--", lw=1, label="mean delta_ref")
        ax.plot([], [], color="black", ls=":", lw=1.2, label="predicted optimum")
        ax.set(title="mean delta_pi where delta_ref < 0", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        f"corruption {entry['corruption']:.2f}, {len(seeds)} seed(s): mean and 95% t-band; the reference prefers the "
        f"rejected response on {ref['misaligned_rate']['mean']:.0%} of held-out pairs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_sweep(results: Sequence[dict[str, Any]], methods: Sequence[str], path: str) -> bool:
    """Final held-out numbers against the corruption ratio, mean over seeds with 95% t error bars; the predicted
    optimum dotted. False if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    ratios = [r["corruption"] for r in results]
    fig, (ax_acc, ax_u, ax_dpi) = plt.subplots(1, 3, figsize=(14, 3.6), dpi=90)
    under = {"color": "gray", "lw": 6, "alpha": 0.3, "solid_capstyle": "round"}
    refs = [r["summary"]["reference"] for r in results]
    ax_acc.plot(ratios, [r["accuracy"]["mean"] for r in refs], label="reference", **under)
    ax_u.plot(ratios, [r["misaligned_rate"]["mean"] for r in refs], label="ref. misaligned rate", **under)
    wrong = [
        (r["corruption"], r["summary"]) for r in results if r["summary"]["reference"].get("mean_delta_ref_misaligned")
    ]
    ax_dpi.plot(
        [c for c, _ in wrong],
        [s["reference"]["mean_delta_ref_misaligned"]["mean"] for _, s in wrong],
        label="delta_ref",
        **under,
    )

    def errorbar(ax, xs, intervals, **style):
        means = [i["mean"] for i in intervals]
        below = [i["mean"] - i["low"] if i["low"] is not None else 0 for i in intervals]
        above = [i["high"] - i["mean"] if i["high"] is not None else 0 for i in intervals]
        ax.errorbar(xs, means, yerr=[below, above], capsize=3, marker="o", ms=4, **style)

    for name in methods:
        style = {"label": name, "color": COLORS.get(name), "ls": LINESTYLES.get(name, "-")}
        rows = [r["summary"]["methods"][name] for r in results]
        errorbar(ax_acc, ratios, [row["accuracy"] for row in rows], **style)
        errorbar(ax_u, ratios, [row["u_fraction"] for row in rows], **style)
        errorbar(
            ax_dpi,
            [c for c, _ in wrong],
            [s["methods"][name]["mean_delta_pi_ref_misaligned"] for _, s in wrong],
            **style,
        )
        predicted = [s["methods"][name].get("predicted_mean_delta_pi_ref_misaligned") for _, s in wrong]
        if all(p is not None for p in predicted):
            ax_dpi.plot([c for c, _ in wrong], [p["mean"] for p in predicted], color=style["color"], ls=":", lw=1.2)
    ax_dpi.plot([], [], color="black", ls=":", lw=1.2, label="predicted optimum")
    ax_dpi.axhline(0, color="black", lw=0.8)
    ax_acc.set(title="final held-out accuracy (delta_pi > 0)", xlabel="corruption ratio", ylim=(-0.02, 1.02))
    ax_u.set(title="final held-out U-fraction", xlabel="corruption ratio", ylim=(-0.02, 1.02))
    ax_dpi.set(title="final mean delta_pi where delta_ref < 0", xlabel="corruption ratio")
    for ax in (ax_acc, ax_u, ax_dpi):
        ax.grid(alpha=0.3)
    ax_dpi.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True
