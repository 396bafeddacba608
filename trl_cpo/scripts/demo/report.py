r"""`trl-cpo demo`'s report: intervals across seeds, the tables, the plots and `results.json`.

Every number the demo reports is a mean over seeds with a 95% Student-t interval,

    mean +- t(0.975, n - 1) * s / sqrt(n),      s = the sample standard deviation over the n seeds,

(`t_interval`); with one seed there is no interval. Seeds vary everything (data, reference, training), so the
interval is about the whole experiment, not only the optimiser's noise; with 3 seeds ``t(0.975, 2) = 4.30``, so it is
wide unless the seeds agree.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

#: Version of the layout of results.json (bumped when a key changes meaning or moves).
SCHEMA_VERSION = 2
CONFIDENCE = 0.95
INTERVAL_NAME = "95% Student-t interval over seeds: mean ± t(0.975, n-1) * sd / sqrt(n) (no interval for n = 1)"

#: Per-row numbers summarised across seeds (keys of each row's "final" block).
ROW_KEYS = (
    "accuracy",
    "u_fraction",
    "accuracy_ref_misaligned",
    "u_fraction_ref_misaligned",
    "mean_delta_pi",
    "mean_delta_pi_ref_misaligned",
    "mean_target_ref_misaligned",
    "predicted_mean_delta_pi",
    "predicted_mean_delta_pi_ref_misaligned",
    "gap_to_predicted_ref_misaligned",
    "spread_around_predicted_ref_misaligned",
    "mean_optimality_residual_ref_misaligned",
    "cpo_gamma",
)
#: Reference numbers (held-out pairs) summarised across seeds.
REFERENCE_KEYS = ("misaligned_rate", "accuracy", "mean_delta_ref_misaligned", "mean_delta_ref_aligned")
#: Reference-report numbers (train set, as the trainers compute and print them) summarised across seeds.
REPORT_KEYS = (
    "misaligned_fraction",
    "misaligned_fraction_ci_low",
    "misaligned_fraction_ci_high",
    "lifted_fraction",
    "recommended_cpo_gamma",
)


# -- intervals ----------------------------------------------------------------------------------------------------------


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer) degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2:
        series, term = (cos, cos) if df > 1 else (0.0, 0.0)
        for k in range(1, (df - 3) // 2 + 1):
            term *= cos * cos * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + sin * series)
    series, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= cos * cos * (2 * k - 1) / (2 * k)
        series += term
    return sin * series


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value: ``P(|T| < t) = confidence`` (e.g. 4.303 for df=2 at 95%)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df={df!r} must be an integer >= 1.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1).")
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < confidence:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central_mass(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def t_interval(values: Sequence[float | None], confidence: float = CONFIDENCE) -> dict[str, Any] | None:
    """``{"mean", "low", "high", "n"}`` of the non-None `values` (see the module docstring); None if there are none.

    ``low`` and ``high`` are None for a single value.
    """
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return {"mean": round(mean, 6), "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return {"mean": round(mean, 6), "low": round(mean - half, 6), "high": round(mean + half, 6), "n": n}


def _summary(records: Sequence[dict | None], keys: Sequence[str]) -> dict[str, Any]:
    present = [r for r in records if r is not None]
    return {
        key: t_interval([r.get(key) for r in present]) for key in keys if any(r.get(key) is not None for r in present)
    }


def report_row(methods: Sequence[str]) -> str | None:
    """The row whose trainer's reference report the table shows: CPO at the default gamma when it runs."""
    for name in ("CPO", "CPO-inverse_logp", "CPO-auto", "E-CPOC"):
        if name in methods:
            return name
    return None


def summarize(entry: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Intervals across the seeds of one corruption ratio: the reference, its report, and every row."""
    seeds = entry["seeds"]
    source = report_row(methods)
    reports = [s["methods"][source]["reference_report"] for s in seeds] if source else []
    return {
        "seeds": [s["seed"] for s in seeds],
        "reference": _summary([s["reference"] for s in seeds], REFERENCE_KEYS),
        "reference_report": {"row": source, **_summary(reports, REPORT_KEYS)} if source else None,
        "methods": {name: _summary([s["methods"][name]["final"] for s in seeds], ROW_KEYS) for name in methods},
    }


# -- tables -------------------------------------------------------------------------------------------------------------

#: Prose lines of the printed report are wrapped at this width (the tables' width too).
TEXT_WIDTH = 100


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=TEXT_WIDTH, break_on_hyphens=False)


def fmt(interval: dict | None, digits: int = 3, percent: bool = False) -> str:
    """``mean ± half-width`` (symmetric t-interval), the mean alone for one seed, ``-`` for nothing."""
    if interval is None or interval.get("mean") is None:
        return "-"
    scale = 100 if percent else 1
    text = f"{interval['mean'] * scale:.{digits}f}"
    if interval["low"] is not None:
        text += f" ± {(interval['high'] - interval['mean']) * scale:.{digits}f}"
    return text + ("%" if percent else "")


#: (header, key) of the printed table; "|wrong" columns are on the held-out pairs with delta_ref < 0.
COLUMNS = (
    ("acc", "accuracy"),
    ("U-frac", "u_fraction"),
    ("target|wrong", "mean_target_ref_misaligned"),
    ("dpi|wrong", "mean_delta_pi_ref_misaligned"),
    ("predicted", "predicted_mean_delta_pi_ref_misaligned"),
)
#: Widths that keep a table within about 100 columns (a docs page shows about that many without scrolling).
METHOD_WIDTH, CELL_WIDTH = 17, 16


def reference_report_lines(entry: dict[str, Any], args) -> list[str]:
    """The trainers' reference report (train set): seed 0's as printed, and its key numbers across seeds."""
    summary = entry["summary"]["reference_report"]
    if summary is None:
        return []
    source = summary["row"]
    first = entry["seeds"][0]["methods"][source]
    lines = [
        f"Reference report on the train set, as {first['trainer']} prints it at its precompute ({source} row, "
        f"seed {entry['seeds'][0]['seed']}):",
        *("  " + line for line in (first["printed_report"] or "").splitlines()),
    ]
    key = [f"misaligned {fmt(summary.get('misaligned_fraction'), 1, percent=True)}"]
    if "lifted_fraction" in summary:
        key.append(f"lifted at cpo_gamma {args.cpo_gamma:g}: {fmt(summary['lifted_fraction'], 1, percent=True)}")
    key.append(f"recommended cpo_gamma (lifts {args.cpo_auto_gamma:.0%}): {fmt(summary.get('recommended_cpo_gamma'))}")
    lines.append(_wrap(f"Across {len(entry['seeds'])} seed(s): " + "; ".join(key) + "."))
    return lines


def format_corruption_table(entry: dict[str, Any], args) -> str:
    summary = entry["summary"]
    ref = summary["reference"]
    first = entry["seeds"][0]
    n_corrupted = len(first["reference"]["corrupted_topics"])
    wrong = ref.get("mean_delta_ref_misaligned")
    lines = [
        _wrap(
            f"Corruption {entry['corruption']:.2f}, seeds {', '.join(map(str, summary['seeds']))}: the reference "
            f"imitates the rejected response on {n_corrupted} of {args.num_topics} topics. On "
            f"{first['data']['eval_pairs']} held-out pairs it prefers the rejected one on "
            f"{fmt(ref['misaligned_rate'], 1, percent=True)} (delta_ref < 0"
            + (f"; mean delta_ref there {fmt(wrong, 2)})." if wrong is not None else ").")
        ),
        *reference_report_lines(entry, args),
        "",
        f"{'method':<{METHOD_WIDTH}}" + "".join(f"{title:>{CELL_WIDTH}}" for title, _ in COLUMNS),
        _reference_row(ref),
    ]
    for name, row in summary["methods"].items():
        cells = "".join(f"{fmt(row.get(key)):>{CELL_WIDTH}}" for _, key in COLUMNS)
        lines.append(f"{name:<{METHOD_WIDTH}}{cells}")
    auto = summary["methods"].get("CPO-auto")
    if auto is not None and auto.get("cpo_gamma") is not None:
        lines.append(
            _wrap(
                f"CPO-auto's cpo_gamma, chosen by its trainer (cpo_auto_gamma {args.cpo_auto_gamma:g}): "
                f"{fmt(auto['cpo_gamma'])} (the other CPO rows: {args.cpo_gamma:g})."
            )
        )
    return "\n".join(lines)


def _reference_row(ref: dict[str, Any]) -> str:
    cells = (fmt(ref["accuracy"]), "0", "-", fmt(ref.get("mean_delta_ref_misaligned")), "-")
    return f"{'reference (SFT)':<{METHOD_WIDTH}}" + "".join(f"{cell:>{CELL_WIDTH}}" for cell in cells)


def format_sweep_table(results: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """Per corruption ratio: the reference, then each row's final held-out numbers with their intervals."""
    columns = (*COLUMNS[:2], *COLUMNS[3:5])
    lines = [f"{'ratio':<7}{'method':<{METHOD_WIDTH}}" + "".join(f"{title:>{CELL_WIDTH}}" for title, _ in columns)]
    for entry in results:
        ref = entry["summary"]["reference"]
        cells = (fmt(ref["accuracy"]), "0", fmt(ref.get("mean_delta_ref_misaligned")), "-")
        lines.append(
            f"{entry['corruption']:<7.2f}{'reference':<{METHOD_WIDTH}}" + "".join(f"{c:>{CELL_WIDTH}}" for c in cells)
        )
        for name in methods:
            row = entry["summary"]["methods"][name]
            cells = "".join(f"{fmt(row.get(key)):>{CELL_WIDTH}}" for _, key in columns)
            lines.append(f"{'':<7}{name:<{METHOD_WIDTH}}{cells}")
    return "\n".join(lines)


def settings_line(args) -> str:
    from .run import ROWS

    rows = "; ".join(f"{name}: {ROWS[name][2]}" for name in args.methods)
    paragraphs = (
        f"Every row: {args.max_steps} steps x {args.per_device_train_batch_size} pairs, AdamW lr "
        f"{args.learning_rate:g} constant, beta {args.beta:g}, reference log-probs precomputed, loss space: "
        f"{LOSS_SPACE_SHORT}; label noise {args.label_noise:g}. Rows: {rows} (cpo_gamma {args.cpo_gamma:g}, "
        f"cpo_auto_gamma {args.cpo_auto_gamma:g}, ecpoc_gamma {args.ecpoc_gamma:g}, ecpoc_tau {args.ecpoc_tau:g}, "
        f"ecpoc_alpha {args.ecpoc_alpha:g}).",
        "acc = share of held-out pairs with delta_pi > 0; U-frac = share with delta_ref < delta_pi < 0; |wrong = "
        "on the held-out pairs with delta_ref < 0; target = the log-odds each loss pushes delta_pi past (DPO: delta_ref); dpi = "
        "mean delta_pi (reference row: mean delta_ref); predicted = mean of each pair's population optimum of the "
        "row's loss under the label noise (docs/demo.md derives it).",
        f"Each cell: mean ± half-width of the {INTERVAL_NAME}.",
    )
    return "\n".join(_wrap(paragraph) for paragraph in paragraphs)


LOSS_SPACE_SHORT = "per-token averaged log-probs (loss_type='sigmoid_norm')"


# -- plots --------------------------------------------------------------------------------------------------------------

COLORS = {"DPO": "tab:red", "CPO": "tab:blue", "CPO-auto": "tab:purple", "CPO-inverse_logp": "tab:orange"}
COLORS["E-CPOC"] = "tab:green"
#: Dashed / dotted where rows overlap (CPO and CPO-inverse_logp sit on DPO's curves at the released settings).
LINESTYLES = {"DPO": "-", "CPO": "--", "CPO-auto": "-", "CPO-inverse_logp": ":", "E-CPOC": "-"}


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


# -- results.json and the end of a run ----------------------------------------------------------------------------------


def environment(args) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    from trl_cpo import __version__

    return {
        "trl_cpo": __version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.num_threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def new_output(args, configs: dict[str, Any]) -> dict[str, Any]:
    """The skeleton of results.json, before any result."""
    from .run import LOSS_SPACE, ROWS, row_settings

    return {
        "schema_version": SCHEMA_VERSION,
        "description": "trl-cpo demo: DPO vs CPO (default, recommended and inverse_logp cpo_gamma) vs E-CPOC from a "
        "reference corrupted on a share of the pairs (arXiv:2605.20834, misaligned-reference experiment), synthetic "
        "task, tiny Llama on CPU, several seeds.",
        "complete": False,
        "loss_space": LOSS_SPACE,
        "interval": INTERVAL_NAME,
        "config": asdict(args),
        "rows": {
            name: {
                "description": ROWS[name][2],
                "config_class": type(configs[name]).__name__,
                **row_settings(name, args),
            }
            for name in args.methods
        },
        "results": [],
        "environment": environment(args),
        "timing_seconds": None,
    }


def write_json(path: str, output: dict[str, Any]) -> None:
    """Write `output` to `path` atomically (a reader never sees half a file)."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(output, f, indent=1)
    os.replace(partial, path)


def format_tables(output: dict[str, Any], args) -> str:
    sections = [settings_line(args), ""]
    for entry in output["results"]:
        sections += [format_corruption_table(entry, args), ""]
    if len(output["results"]) > 1:
        sections += [
            "Across corruption ratios (final held-out numbers):",
            format_sweep_table(output["results"], args.methods),
            "",
        ]
    return "\n".join(sections).rstrip() + "\n"


def finish(output: dict[str, Any], args) -> None:
    """Print the tables, then write table.txt, the plots and the final results.json."""
    table = format_tables(output, args)
    print(table, end="", flush=True)
    paths = [os.path.join(args.output_dir, "table.txt")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(table)
    plotted = []
    for entry in output["results"]:
        path = os.path.join(args.output_dir, f"curves_corruption-{entry['corruption']:.2f}.png")
        if plot_curves(entry, path):
            plotted.append(path)
    if len(output["results"]) > 1:
        path = os.path.join(args.output_dir, "sweep.png")
        if plot_sweep(output["results"], args.methods, path):
            plotted.append(path)
    json_path = os.path.join(args.output_dir, "results.json")
    write_json(json_path, output)
    print(f"\nWrote {', '.join([*paths, json_path, *plotted])}")
    if not plotted:
        from trl_cpo._plotting import PLOTS_EXTRA_HINT

        print(f"matplotlib is not installed: no plot written ({PLOTS_EXTRA_HINT}).", file=sys.stderr)
    print(f"Total wall time: {output['timing_seconds']:.0f} s")
