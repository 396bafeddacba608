"""The audit's figure: delta_ref in the loss's space, the two spaces against each other, misalignment by length.

matplotlib is optional (`pip install 'trl-cpo[plots]'`): without it the audit writes everything else and says so.
"""

from __future__ import annotations

from trl_cpo._plotting import PLOTS_EXTRA_HINT, require_matplotlib

#: The message shown when matplotlib is missing.
MISSING_MATPLOTLIB = "matplotlib is not installed, so no {file}; " + PLOTS_EXTRA_HINT + " to get it"


def import_pyplot():
    """matplotlib's pyplot with a file-only backend, or None if matplotlib is not installed."""
    try:
        return require_matplotlib()
    except ImportError:
        return None


def plot(path: str, payload: dict, pairs: list[dict]) -> bool:
    """Write the three-panel figure to `path`; False (nothing written) if matplotlib is missing."""
    plt = import_pyplot()
    if plt is None:
        return False
    import numpy as np

    space = "per_token" if payload["loss_space"] != "summed" else "summed"
    summed = np.array([p["delta_ref_summed"] for p in pairs])
    per_token = np.array([p["delta_ref_per_token"] for p in pairs])
    delta = per_token if space == "per_token" else summed
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))

    edges = np.histogram_bin_edges(delta, bins=min(60, max(10, len(delta) // 5)))
    edges = np.unique(np.append(edges, 0.0))  # 0 is a bin edge: each bar is one colour
    left.hist(
        [delta[delta < 0], delta[delta >= 0]],
        bins=edges,
        stacked=True,
        color=["#c44e52", "#4c72b0"],
        label=["delta_ref < 0 (reference prefers rejected)", "delta_ref >= 0"],
    )
    left.axvline(0.0, color="black", linestyle="--", linewidth=1)
    low, high = payload["misaligned_fraction_ci_low"], payload["misaligned_fraction_ci_high"]
    left.set_title(
        f"{100 * payload['misaligned_fraction']:.1f}% misaligned (95% CI {100 * low:.1f}-{100 * high:.1f}%)"
    )
    left.set_xlabel(f"delta_ref ({'per-token' if space == 'per_token' else 'summed'}: the loss's space)")
    left.set_ylabel("pairs")
    left.legend(fontsize=8)

    differs = np.sign(summed) != np.sign(per_token)
    middle.scatter(summed[~differs], per_token[~differs], s=8, color="#4c72b0", label="same sign")
    middle.scatter(summed[differs], per_token[differs], s=8, color="#dd8452", label="sign differs")
    middle.axhline(0.0, color="black", linewidth=0.8)
    middle.axvline(0.0, color="black", linewidth=0.8)
    middle.set_xlabel("delta_ref summed")
    middle.set_ylabel("delta_ref per token")
    middle.set_title(f"Sign differs between spaces on {100 * payload['sign_differs_fraction']:.1f}% of pairs")
    middle.legend(fontsize=8)

    buckets = payload["length_buckets"]
    x = np.arange(len(buckets))
    for offset, (key, label, color) in zip(
        (-0.2, 0.2), (("summed", "summed", "#8172b3"), ("per_token", "per-token", "#55a868"))
    ):
        values = np.array([b[f"misaligned_fraction_{key}"] for b in buckets])
        lows = np.array([b[f"misaligned_fraction_{key}_ci_low"] for b in buckets])
        highs = np.array([b[f"misaligned_fraction_{key}_ci_high"] for b in buckets])
        right.bar(x + offset, values, width=0.4, color=color, label=label)
        right.errorbar(x + offset, values, yerr=[values - lows, highs - values], fmt="none", ecolor="black")
    right.set_xticks(x, [f"{b['min_tokens']:.3g}-{b['max_tokens']:.3g}" for b in buckets])
    right.set_xlabel("mean completion tokens of the pair")
    right.set_ylabel("misaligned fraction (95% CI)")
    right.set_title("Misaligned by completion length")
    right.legend(fontsize=8)

    fig.suptitle(f"trl-cpo audit: {payload['dataset_name']} scored by {payload['model_name_or_path']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
