"""`trl-cpo demo`'s report: numbers across seeds (`stats.t_interval`), the tables, `results.json`, and the end of a
run (`finish`: the tables first, then the files and the plots of `plots`)."""

from __future__ import annotations

import json
import os
import platform
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .plots import plot_curves, plot_sweep
from .rows import LOSS_SPACE, ROWS, row_settings
from .stats import INTERVAL_NAME, t_interval

#: Version of the layout of results.json (bumped when a key changes meaning or moves).
SCHEMA_VERSION = 2

#: Per-row numbers summarised across seeds (keys of each row's "final" block).
ROW_KEYS = (
    "accuracy",
    "reward_accuracy",
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


def _summary(records: Sequence[dict | None], keys: Sequence[str]) -> dict[str, Any]:
    present = [r for r in records if r is not None]
    return {
        key: t_interval([r.get(key) for r in present]) for key in keys if any(r.get(key) is not None for r in present)
    }


def report_row(methods: Sequence[str]) -> str | None:
    """The row whose trainer's reference report the table shows: CPO at the default gamma when it runs."""
    for name in ("CPO", "CPO-inverse_logp", "CPO-auto", "E-CPOC", "HyPO"):
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
    rows = "; ".join(f"{name}: {ROWS[name].description}" for name in args.methods)
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


# -- results.json and the end of a run ----------------------------------------------------------------------------------


def environment(args) -> dict[str, Any]:
    from importlib.metadata import version

    import torch
    import transformers
    import trl

    __version__ = version("trl-cpo")

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
    return {
        "schema_version": SCHEMA_VERSION,
        "description": "trl-cpo demo: DPO vs CPO (default, recommended and inverse_logp cpo_gamma) vs E-CPOC vs HyPO from a "
        "reference corrupted on a share of the pairs (arXiv:2605.20834, misaligned-reference experiment), synthetic "
        "task, tiny Llama on CPU, several seeds.",
        "complete": False,
        "loss_space": LOSS_SPACE,
        "interval": INTERVAL_NAME,
        "config": asdict(args),
        "rows": {
            name: {
                "description": ROWS[name].description,
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
