"""The figure of docs/training-diagnostics.md: ranking accuracy against reward accuracy for DPO and CPO on the demo's
task, with the U-fraction.

    python docs/make_diagnostics_figure.py                 # about 90 s on 2 busy CPU cores; needs matplotlib
    python docs/make_diagnostics_figure.py --seeds 1 --out /tmp/figure.png

Runs `trl-cpo demo --methods DPO CPO CPO-auto --eval_every 10` (the demo's defaults otherwise: reference corrupted on
40% of the topics, 150 steps, 3 seeds) in a temporary folder and plots, per row, the held-out ranking accuracy
(`delta_pi > 0`), reward accuracy (`delta_pi > delta_ref`, per token) and U-fraction against step: mean over seeds with
the 95% t-band.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "docs", "assets", "training-diagnostics", "ranking-vs-reward-accuracy.png")
ROWS = ("DPO", "CPO", "CPO-auto")
CURVES = (
    ("accuracy", "ranking accuracy (delta_pi > 0)", "tab:blue", "-"),
    ("reward_accuracy", "reward accuracy (delta_pi > delta_ref)", "tab:orange", "--"),
    ("u_fraction", "U-fraction (delta_ref < delta_pi < 0)", "tab:red", ":"),
)
TITLES = {"DPO": "DPO", "CPO": "CPO, cpo_gamma 0.05 (released)", "CPO-auto": "CPO, cpo_gamma chosen from the data"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trl_cpo.scripts.demo import run
    from trl_cpo.scripts.demo.plots import _band

    with tempfile.TemporaryDirectory(prefix="diagnostics-figure-") as work:
        demo = ["--methods", *ROWS, "--eval_every", "10", "--seeds", str(args.seeds), "--disable_tqdm"]
        if run.main([*demo, "--output_dir", work]) != 0:
            return 1
        with open(os.path.join(work, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    seeds = results["results"][0]["seeds"]
    fig, axes = plt.subplots(1, len(ROWS), figsize=(13, 3.6), dpi=100, sharey=True)
    for ax, row in zip(axes, ROWS):
        steps = [h["step"] for h in seeds[0]["methods"][row]["history"]]
        for key, label, color, style in CURVES:
            mean, low, high = _band([[h[key] for h in seed["methods"][row]["history"]] for seed in seeds])
            ax.plot(steps, mean, color=color, ls=style, lw=1.8, label=label)
            print(f"{row:9s} {key:16s} " + " ".join(f"{step}:{value:.3f}" for step, value in zip(steps, mean)))
            ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
        ax.set(title=TITLES[row], xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out share of pairs ({len(seeds)} seeds)")
    axes[-1].legend(fontsize=8, loc="center right")
    fig.suptitle(
        "Reference wrong on 40% of the pairs: reward accuracy looks fine while ranking accuracy stays and U grows",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
