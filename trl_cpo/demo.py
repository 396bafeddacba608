"""`trl-cpo demo`: DPO, CPO and E-CPOC from a misaligned reference, and the undesirable space U, on a tiny CPU model.

A small-scale version of the misaligned-reference experiment of arXiv:2605.20834 (Appendix A.2), offline, in a few
minutes on 2 CPU cores:

1. build a word-level tokenizer and a 2-layer Llama locally (no download);
2. train a reference by SFT on a synthetic preference task where, on a share ``--corruption`` of the topics, the
   reference imitates the rejected response (see `trl_cpo._demo_task`), and measure its misalignment rate
   (``delta_ref < 0``) on held-out pairs;
3. from that same reference, on the same pairs, seed and budget, train DPO (``trl.DPOTrainer``,
   ``loss_type="sigmoid_norm"``), CPO (`trl_cpo.CPOTrainer`) and E-CPOC (`trl_cpo.ECPOCTrainer`), all on
   length-normalized log-probs with precomputed reference log-probs;
4. every few steps, measure on held-out pairs the preference accuracy (``delta_pi > 0``) and the U-fraction
   (``delta_ref < delta_pi < 0``); print a table, write a PNG of the curves and a JSON file with every number.

Several ``--corruption`` values sweep the ratio and add a plot and a table across ratios.

Not related to TRL's Contrastive Preference Optimization (``trl.experimental.cpo``): same acronym, different method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from . import _demo_task as task_lib
from .logps import is_length_normalized, to_loss_space
from .metrics import in_undesirable_space, ref_misaligned_fraction, u_fraction

METHODS = ("DPO", "CPO", "E-CPOC")
LOSS_SPACE = "length-normalized log-probs (mean per completion token, EOS included)"
DEFAULT_CORRUPTION = (0.4,)
SWEEP_HINT = "0 0.2 0.4 0.6"


# -- command line -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-cpo demo",
        description=(
            "Train DPO, CPO and E-CPOC on a tiny model on CPU from a reference that prefers the rejected response on "
            "a share of the pairs, and measure how many held-out pairs each leaves in the undesirable space U "
            "(delta_ref < delta_pi < 0): the misaligned-reference experiment of arXiv:2605.20834 at small scale. "
            "Offline; about a minute on 2 CPU cores (a 4-ratio sweep: a few minutes). CPO here is Constrained "
            "Preference Optimization, not TRL's Contrastive Preference Optimization."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--corruption",
        type=float,
        nargs="+",
        default=list(DEFAULT_CORRUPTION),
        help=f"Share(s) of the topics (hence pairs) on which the reference imitates the rejected response. Several "
        f"values run a sweep, e.g. --corruption {SWEEP_HINT}.",
    )
    run.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Methods to train from the reference."
    )
    run.add_argument("--max_steps", type=int, default=150, help="Optimizer steps per method (same budget for all).")
    run.add_argument("--per_device_train_batch_size", type=int, default=16, help="Preference pairs per step.")
    run.add_argument(
        "--learning_rate", type=float, default=5e-4, help="AdamW learning rate, constant, same for all methods."
    )
    run.add_argument("--eval_every", type=int, default=10, help="Measure on held-out pairs every N steps.")
    run.add_argument("--seed", type=int, default=0, help="Seed of the data, the model, the reference and training.")
    run.add_argument("--output_dir", default="demo_output", help="Where the table, PNG(s) and JSON are written.")
    run.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads. 1 is fastest for this tiny model and keeps runs reproducible across machines.",
    )
    run.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")

    hp = parser.add_argument_group("method hyperparameters")
    hp.add_argument(
        "--beta",
        type=float,
        default=2.5,
        help="Inverse temperature, shared by all methods (released CPO setting on length-normalized log-probs).",
    )
    hp.add_argument("--cpo_gamma", type=float, default=0.05, help="CPO constraint strength (released setting 0.05).")
    hp.add_argument(
        "--cpo_margin_type",
        choices=("inverse_prob", "inverse_logp"),
        default="inverse_prob",
        help="CPO numerics of 1/pi_ref: the paper's 'inverse_prob' or the released code's 'inverse_logp'.",
    )
    hp.add_argument("--cpo_max_margin", type=float, default=10.0, help="Cap on the CPO margin (logit units).")
    hp.add_argument("--ecpoc_gamma", type=float, default=0.5, help="E-CPOC floor of the target log-odds.")
    hp.add_argument("--ecpoc_tau", type=float, default=2.0, help="E-CPOC smooth-max sharpness.")
    hp.add_argument(
        "--ecpoc_alpha", type=float, default=1.0, help="E-CPOC scale 1/ecpoc_alpha of the correction term."
    )

    data = parser.add_argument_group("synthetic task and reference")
    data.add_argument("--num_topics", type=int, default=10, help="Topics; corruption is applied per topic.")
    data.add_argument(
        "--label_noise",
        type=float,
        default=0.2,
        help="Share of training pairs whose chosen/rejected labels are swapped (annotator disagreement).",
    )
    data.add_argument(
        "--ref_noise",
        type=float,
        default=0.1,
        help="Per-word chance that the reference's SFT target uses the other pool: sets how confident it is.",
    )
    data.add_argument(
        "--train_pairs",
        type=int,
        default=2400,
        help="Training pairs; they also build the reference's SFT data, so this is independent of --max_steps (the "
        "default 2400 = 150 steps x 16 pairs: each pair seen once at the default budget).",
    )
    data.add_argument("--eval_pairs", type=int, default=480, help="Held-out pairs (majority labels).")
    data.add_argument("--ref_steps", type=int, default=300, help="SFT steps of the reference.")
    data.add_argument("--ref_learning_rate", type=float, default=3e-3, help="SFT learning rate of the reference.")
    data.add_argument("--ref_batch_size", type=int, default=32, help="SFT batch size of the reference.")
    data.add_argument("--hidden_size", type=int, default=64, help="Width of the tiny Llama.")
    data.add_argument("--num_layers", type=int, default=2, help="Layers of the tiny Llama.")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = (
        "max_steps",
        "per_device_train_batch_size",
        "eval_every",
        "eval_pairs",
        "ref_steps",
        "ref_batch_size",
        "num_threads",
    )
    for name in positive + ("hidden_size", "num_layers", "num_topics"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.train_pairs < 1:
        parser.error("--train_pairs must be >= 1")
    if any(not 0 <= c <= 1 for c in args.corruption):
        parser.error("--corruption values must be in [0, 1]")
    if args.hidden_size % 4:
        parser.error("--hidden_size must be a multiple of 4 (4 attention heads)")
    if not 0 <= args.label_noise < 0.5 or not 0 <= args.ref_noise < 0.5:
        parser.error("--label_noise and --ref_noise must be in [0, 0.5)")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods lists a method twice")
    if len(set(args.corruption)) != len(args.corruption):
        parser.error("--corruption lists a value twice")


# -- measurements -----------------------------------------------------------------------------------------------------


def _mean_or_none(values: torch.Tensor) -> float | None:
    return round(values.float().mean().item(), 6) if values.numel() else None


def held_out_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> dict[str, float | None]:
    """Preference accuracy, U-fraction and mean policy log-odds on held-out pairs (inputs in the loss's space).

    The ``*_ref_misaligned`` entries restrict to the pairs the reference gets wrong (``delta_ref < 0``), the only ones
    that can lie in U; they are ``None`` when there are none.
    """
    delta_pi = policy_chosen - policy_rejected
    misaligned = (ref_chosen - ref_rejected) < 0
    in_u = in_undesirable_space(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return {
        "accuracy": _mean_or_none(delta_pi > 0),
        "u_fraction": round(u_fraction(policy_chosen, policy_rejected, ref_chosen, ref_rejected).item(), 6),
        "accuracy_ref_misaligned": _mean_or_none(delta_pi[misaligned] > 0),
        "u_fraction_ref_misaligned": _mean_or_none(in_u[misaligned]),
        "mean_delta_pi": _mean_or_none(delta_pi),
        "mean_delta_pi_ref_misaligned": _mean_or_none(delta_pi[misaligned]),
    }


class _HeldOut:
    """Held-out pairs, tokenized once, and the reference's log-probs on them.

    `reference` keeps the summed log-probs and lengths (a `trl_cpo.reference.ReferenceLogps`, what the method targets
    are computed from); `ref_chosen` / `ref_rejected` are the length-normalized values the measurements use.
    """

    def __init__(self, tokenizer, pairs: Sequence[dict], reference):
        from .reference import ReferenceLogps

        self.pad_token_id = tokenizer.pad_token_id
        self.chosen = [task_lib.encode(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
        self.rejected = [task_lib.encode(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
        self.reference = ReferenceLogps(*self._summed(reference))
        self.ref_chosen, self.ref_rejected = self.reference.per_token()

    def _summed(self, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, chosen_len = task_lib.completion_logps(model, self.chosen, self.pad_token_id)
        rejected, rejected_len = task_lib.completion_logps(model, self.rejected, self.pad_token_id)
        return chosen, rejected, chosen_len, rejected_len

    def logps(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        return to_loss_space(*self._summed(model), length_normalized=True)

    def measure(self, model) -> dict[str, float | None]:
        return held_out_metrics(*self.logps(model), self.ref_chosen, self.ref_rejected)


def _monitor_callback(held_out: _HeldOut, history: list, eval_every: int, bar):
    from transformers import TrainerCallback

    class HeldOutMonitor(TrainerCallback):
        """Measure the policy on held-out pairs at step 0, every `eval_every` steps and at the last step."""

        def _record(self, step: int, model) -> None:
            metrics = held_out.measure(model)
            history.append({"step": step, **metrics})
            if bar is not None:
                bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", U=f"{metrics['u_fraction']:.3f}", refresh=False)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % eval_every == 0 or step == state.max_steps:
                self._record(step, model)
            if bar is not None:
                bar.update(1)

    return HeldOutMonitor()


# -- training ---------------------------------------------------------------------------------------------------------


def _table_method(name: str):
    """The `trl_cpo.methods.METHODS` entry of a demo method ("CPO", "E-CPOC"), looked up by its title."""
    from .methods import METHODS as TABLE

    return next(method for method in TABLE.values() if method.title == name)


def _method_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trainer, config class and the method's own hyperparameters (all methods on length-normalized log-probs)."""
    if name == "DPO":
        from trl import DPOConfig, DPOTrainer

        trainer, config, kwargs = DPOTrainer, DPOConfig, {}
    else:
        method = _table_method(name)
        # The demo's flags carry the config field names (--cpo_gamma, --ecpoc_tau, ...).
        trainer, config, kwargs = method.trainer_class, method.config_class, method.settings(args)
    return {
        "trainer": trainer,
        "config": config,
        "kwargs": {**kwargs, "loss_type": ["sigmoid_norm"]},
        "hyperparameters": {"beta": args.beta, **kwargs, "loss_type": "sigmoid_norm"},
    }


def method_target(name: str, reference, config) -> torch.Tensor:
    """Per-pair target log-odds each loss pushes ``delta_pi`` past, in the space of ``config.loss_type``.

    `reference` is a `trl_cpo.reference.ReferenceLogps` (summed log-probs and lengths); `config` the method's training
    config (or any object with its `beta`, `loss_type` and method fields). DPO: ``delta_ref``; CPO:
    ``delta_ref + m / beta`` with the margin ``m`` on per-token reference probabilities; E-CPOC: its smoothed
    ``max(delta_ref, ecpoc_gamma)``. The CPO and E-CPOC targets are those the trainers use
    (`trl_cpo.methods.Method.target_from_config`).
    """
    if name == "DPO":
        return reference.delta_ref(is_length_normalized(config.loss_type))
    return _table_method(name).target_from_config(reference, config)


def _train_method(
    name: str, reference, tokenizer, train_dataset, held_out: _HeldOut, args, work_dir: str, label: str
) -> dict[str, Any]:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    spec = _method_spec(name, args)
    config = spec["config"](
        output_dir=os.path.join(work_dir, name),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=args.eval_every,
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        beta=args.beta,
        precompute_ref_log_probs=True,
        max_length=None,
        disable_tqdm=True,
        **spec["kwargs"],
    )
    policy = copy.deepcopy(reference)
    history: list[dict] = []
    start = time.perf_counter()
    trainer = spec["trainer"](model=policy, args=config, train_dataset=train_dataset, processing_class=tokenizer)
    bar = _bar(total=args.max_steps, desc=f"{label} {name:<6}", disable=args.no_progress)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_monitor_callback(held_out, history, args.eval_every, bar))
    try:
        trainer.train()
    finally:
        if bar is not None:
            bar.close()
    train_loss = [
        {"step": entry["step"], "loss": round(entry["loss"], 6)}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    target = method_target(name, held_out.reference, config)
    misaligned = held_out.ref_chosen < held_out.ref_rejected
    return {
        "trainer": f"{spec['trainer'].__module__.split('.')[0]}.{spec['trainer'].__name__}",
        "loss_type": list(config.loss_type),
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "hyperparameters": spec["hyperparameters"],
        "mean_target": _mean_or_none(target),
        "mean_target_ref_misaligned": _mean_or_none(target[misaligned]),
        "history": history,
        "final": {k: v for k, v in history[-1].items() if k != "step"},
        "train_loss": train_loss,
        "timing_seconds": round(time.perf_counter() - start, 2),
    }


def _bar(total: int, desc: str, disable: bool):
    if disable:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def run_corruption(ratio: float, args: argparse.Namespace, work_dir: str) -> dict[str, Any]:
    """Reference SFT at one corruption ratio, then every method from it; all numbers for that ratio."""
    from datasets import Dataset

    from .tiny import build_tiny_llama, build_tiny_tokenizer

    task = task_lib.TaskConfig(num_topics=args.num_topics, label_noise=args.label_noise, ref_noise=args.ref_noise)
    train_pairs = task_lib.make_pairs(task, args.train_pairs, seed=args.seed, label_noise=task.label_noise)
    eval_pairs = task_lib.make_pairs(task, args.eval_pairs, seed=args.seed + 1_000_003, label_noise=0.0)
    corrupted = task_lib.corrupted_topics(task.num_topics, ratio, seed=args.seed)
    label = f"corruption {ratio:.2f}:"

    torch.manual_seed(args.seed)
    tokenizer = build_tiny_tokenizer([" ".join(task.vocabulary())], vocab_size=len(task.vocabulary()) + 10)
    reference = build_tiny_llama(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, max_position_embeddings=64, seed=args.seed
    )
    sft_items = [
        task_lib.encode(tokenizer, prompt, target)
        for prompt, target in task_lib.reference_sft_examples(task, train_pairs, corrupted, seed=args.seed)
    ]
    start = time.perf_counter()
    bar = _bar(total=args.ref_steps, desc=f"{label} reference SFT", disable=args.no_progress)

    def on_step(step: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        sft_losses = task_lib.train_sft(
            reference,
            sft_items,
            pad_token_id=tokenizer.pad_token_id,
            steps=args.ref_steps,
            batch_size=args.ref_batch_size,
            learning_rate=args.ref_learning_rate,
            seed=args.seed,
            on_step=on_step,
        )
    finally:
        if bar is not None:
            bar.close()
    sft_seconds = time.perf_counter() - start

    held_out = _HeldOut(tokenizer, eval_pairs, reference)
    delta_ref = held_out.ref_chosen - held_out.ref_rejected
    misaligned = delta_ref < 0
    reference_stats = {
        "corrupted_topics": corrupted,
        "corrupted_share": len(corrupted) / task.num_topics,
        "misaligned_rate": round(ref_misaligned_fraction(held_out.ref_chosen, held_out.ref_rejected).item(), 6),
        "accuracy": _mean_or_none(delta_ref > 0),
        "mean_delta_ref_misaligned": _mean_or_none(delta_ref[misaligned]),
        "mean_delta_ref_aligned": _mean_or_none(delta_ref[~misaligned]),
        "dpo_predicted_delta_pi_misaligned": None,
        "sft_final_loss": round(sum(sft_losses[-10:]) / len(sft_losses[-10:]), 6),
        "timing_seconds": round(sft_seconds, 2),
    }
    if reference_stats["mean_delta_ref_misaligned"] is not None and task.label_noise > 0:
        # DPO's population optimum with noisy labels: beta * (delta_pi - delta_ref) = logit(1 - label_noise).
        logit = math.log((1 - task.label_noise) / task.label_noise)
        reference_stats["dpo_predicted_delta_pi_misaligned"] = round(
            reference_stats["mean_delta_ref_misaligned"] + logit / args.beta, 6
        )

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in train_pairs]
    train_dataset = Dataset.from_list(rows)
    methods = {}
    for name in args.methods:
        methods[name] = _train_method(
            name, reference, tokenizer, train_dataset, held_out, args, os.path.join(work_dir, f"{ratio:.2f}"), label
        )
    return {
        "corruption": ratio,
        "reference": reference_stats,
        "methods": methods,
        "data": {
            "train_pairs": len(train_pairs),
            "train_pairs_swapped": sum(p["swapped"] for p in train_pairs),
            "eval_pairs": len(eval_pairs),
            "example_pair": {k: eval_pairs[0][k] for k in ("prompt", "chosen", "rejected")},
        },
    }


# -- report -----------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, width: int = 6) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def format_corruption_table(result: dict[str, Any]) -> str:
    ref = result["reference"]
    n_topics = len(ref["corrupted_topics"])
    lines = [
        f"Corruption {result['corruption']:.2f}: the reference imitates the rejected response on {n_topics} topic(s) "
        f"({ref['corrupted_share']:.0%} of pairs by construction);",
        f"measured on {result['data']['eval_pairs']} held-out pairs it prefers the rejected response on "
        f"{ref['misaligned_rate']:.1%} (delta_ref < 0, mean delta_ref there: "
        f"{_fmt(ref['mean_delta_ref_misaligned'], 0).strip()}).",
        "",
        f"{'method':<10}{'trainer':<26}{'acc':>7}{'U-frac':>8}{'acc|ref-wrong':>15}{'U|ref-wrong':>13}"
        f"{'target|ref-wrong':>18}{'dpi|ref-wrong':>15}",
        f"{'reference':<10}{'(SFT)':<26}{_fmt(ref['accuracy'], 7)}{_fmt(0.0, 8)}"
        f"{_fmt(0.0 if ref['misaligned_rate'] else None, 15)}{_fmt(0.0 if ref['misaligned_rate'] else None, 13)}"
        f"{_fmt(None, 18)}{_fmt(ref['mean_delta_ref_misaligned'], 15)}",
    ]
    for name, method in result["methods"].items():
        final = method["final"]
        lines.append(
            f"{name:<10}{method['trainer']:<26}{_fmt(final['accuracy'], 7)}{_fmt(final['u_fraction'], 8)}"
            f"{_fmt(final['accuracy_ref_misaligned'], 15)}{_fmt(final['u_fraction_ref_misaligned'], 13)}"
            f"{_fmt(method['mean_target_ref_misaligned'], 18)}{_fmt(final['mean_delta_pi_ref_misaligned'], 15)}"
        )
    return "\n".join(lines)


def format_sweep_table(results: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    header = f"{'corruption':>10}{'ref wrong':>11}" + "".join(f"{m + ' acc':>12}{m + ' U':>10}" for m in methods)
    lines = [header]
    for result in results:
        row = f"{result['corruption']:>10.2f}{result['reference']['misaligned_rate']:>11.3f}"
        for m in methods:
            final = result["methods"][m]["final"]
            row += f"{_fmt(final['accuracy'], 12)}{_fmt(final['u_fraction'], 10)}"
        lines.append(row)
    return "\n".join(lines)


def _settings_line(args: argparse.Namespace) -> str:
    return (
        f"All methods: {args.max_steps} steps x {args.per_device_train_batch_size} pairs, AdamW lr "
        f"{args.learning_rate:g} constant, seed {args.seed}, beta {args.beta:g}, reference log-probs precomputed; "
        f"loss space: {LOSS_SPACE} (DPO = trl.DPOTrainer loss_type='sigmoid_norm'; CPO cpo_gamma {args.cpo_gamma:g} "
        f"{args.cpo_margin_type}, margin on per-token reference probabilities; E-CPOC ecpoc_gamma "
        f"{args.ecpoc_gamma:g} ecpoc_tau {args.ecpoc_tau:g} ecpoc_alpha {args.ecpoc_alpha:g}). acc = share of "
        "held-out pairs with delta_pi > 0; U-frac = share with delta_ref < delta_pi < 0; |ref-wrong = on the pairs "
        "with delta_ref < 0; target = the log-odds each loss pushes delta_pi past (DPO: delta_ref); dpi = mean "
        "delta_pi (the reference row: mean delta_ref)."
    )


COLORS = {"DPO": "tab:red", "CPO": "tab:blue", "E-CPOC": "tab:green"}
#: CPO dashed, so that it stays visible where it overlaps DPO.
LINESTYLES = {"DPO": "-", "CPO": "--", "E-CPOC": "-"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict[str, Any], path: str) -> bool:
    """Held-out accuracy and U-fraction against step, one line per method. False if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    ref = result["reference"]
    show_dpi = ref["mean_delta_ref_misaligned"] is not None
    fig, axes = plt.subplots(1, 3 if show_dpi else 2, figsize=(13.5 if show_dpi else 9, 3.5), dpi=90)
    ax_acc, ax_u = axes[0], axes[1]
    for name, method in result["methods"].items():
        steps = [h["step"] for h in method["history"]]
        style = {"label": name, "color": COLORS.get(name), "ls": LINESTYLES.get(name, "-"), "lw": 1.8}
        ax_acc.plot(steps, [h["accuracy"] for h in method["history"]], **style)
        ax_u.plot(steps, [h["u_fraction"] for h in method["history"]], **style)
        if show_dpi:
            axes[2].plot(steps, [h["mean_delta_pi_ref_misaligned"] for h in method["history"]], **style)
            # The log-odds this method's loss pushes past (DPO's coincides with mean delta_ref).
            axes[2].axhline(method["mean_target_ref_misaligned"], color=COLORS.get(name), ls=":", lw=1.2)
    ax_acc.axhline(ref["accuracy"], color="gray", ls="--", lw=1, label="reference")
    ax_u.axhline(ref["misaligned_rate"], color="gray", ls=":", lw=1, label="ref. misaligned rate")
    ax_acc.set(title="held-out accuracy (delta_pi > 0)", xlabel="step", ylim=(-0.02, 1.02))
    ax_u.set(title="held-out U-fraction (delta_ref < delta_pi < 0)", xlabel="step", ylim=(-0.02, 1.02))
    if show_dpi:
        ax = axes[2]
        ax.axhspan(ref["mean_delta_ref_misaligned"], 0, color="tab:red", alpha=0.08, label="U (at mean delta_ref)")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(ref["mean_delta_ref_misaligned"], color="gray", ls="--", lw=1, label="mean delta_ref")
        ax.plot([], [], color="black", ls=":", lw=1.2, label="each loss's target")
        ax.set(title="mean delta_pi where delta_ref < 0", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax is axes[-1] and show_dpi:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"corruption {result['corruption']:.2f}: reference prefers the rejected response on "
        f"{ref['misaligned_rate']:.0%} of held-out pairs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_sweep(results: Sequence[dict[str, Any]], methods: Sequence[str], path: str) -> bool:
    """Final held-out numbers against the corruption ratio, one line per method. False if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    ratios = [r["corruption"] for r in results]
    fig, (ax_acc, ax_u, ax_dpi) = plt.subplots(1, 3, figsize=(13.5, 3.5), dpi=90)
    # The reference is drawn wide and pale underneath, so that methods which stay on it remain visible.
    under = {"color": "gray", "lw": 6, "alpha": 0.3, "solid_capstyle": "round"}
    ax_acc.plot(ratios, [r["reference"]["accuracy"] for r in results], label="reference", **under)
    ax_u.plot(ratios, [r["reference"]["misaligned_rate"] for r in results], label="ref. misaligned rate", **under)
    wrong = [r for r in results if r["reference"]["mean_delta_ref_misaligned"] is not None]
    wrong_ratios = [r["corruption"] for r in wrong]
    ax_dpi.plot(wrong_ratios, [r["reference"]["mean_delta_ref_misaligned"] for r in wrong], label="delta_ref", **under)
    for name in methods:
        style = {"label": name, "color": COLORS.get(name), "ls": LINESTYLES.get(name, "-"), "marker": "o", "ms": 4}
        finals = [r["methods"][name]["final"] for r in results]
        ax_acc.plot(ratios, [f["accuracy"] for f in finals], **style)
        ax_u.plot(ratios, [f["u_fraction"] for f in finals], **style)
        ax_dpi.plot(
            wrong_ratios, [r["methods"][name]["final"]["mean_delta_pi_ref_misaligned"] for r in wrong], **style
        )
    ax_dpi.axhline(0, color="black", lw=0.8)
    ax_acc.set(title="final held-out accuracy (delta_pi > 0)", xlabel="corruption ratio", ylim=(-0.02, 1.02))
    ax_u.set(title="final held-out U-fraction", xlabel="corruption ratio", ylim=(-0.02, 1.02))
    ax_dpi.set(title="final mean delta_pi where delta_ref < 0", xlabel="corruption ratio")
    for ax in (ax_acc, ax_u, ax_dpi):
        ax.grid(alpha=0.3)
        if ax is ax_dpi:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    import trl

    from . import __version__

    return {
        "trl_cpo": __version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.num_threads,
    }


@contextlib.contextmanager
def _quiet(num_threads: int, progress: bool):
    """Fix torch's thread count and silence library chatter for the duration of the run, then restore both."""
    import datasets
    import transformers

    tqdm_disable = os.environ.get("TQDM_DISABLE")
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"  # TRL's own precompute bar reads it
    threads = torch.get_num_threads()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    torch.set_num_threads(num_threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # Library notices about tiny-model configs and CPU-only settings; they say nothing about the results.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        torch.set_num_threads(threads)
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable
        if bars:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(verbosity)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run every corruption ratio, write table / PNG(s) / JSON under `args.output_dir`, return the results."""
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    results = []
    with (
        _quiet(args.num_threads, not args.no_progress),
        tempfile.TemporaryDirectory(prefix="trl-cpo-demo-") as work_dir,
    ):
        for ratio in args.corruption:
            results.append(run_corruption(ratio, args, work_dir))
    total_seconds = time.perf_counter() - start

    sections = [_settings_line(args), ""]
    files = {
        "json": os.path.join(args.output_dir, "results.json"),
        "table": os.path.join(args.output_dir, "table.txt"),
    }
    plots = []
    for result in results:
        sections += [format_corruption_table(result), ""]
        path = os.path.join(args.output_dir, f"curves_corruption-{result['corruption']:.2f}.png")
        if plot_curves(result, path):
            plots.append(path)
    if len(results) > 1:
        sections += [
            "Across corruption ratios (final held-out numbers):",
            format_sweep_table(results, args.methods),
            "",
        ]
        path = os.path.join(args.output_dir, "sweep.png")
        if plot_sweep(results, args.methods, path):
            plots.append(path)
    table = "\n".join(sections).rstrip() + "\n"

    output = {
        "description": "trl-cpo demo: DPO vs CPO vs E-CPOC from a reference corrupted on a share of the pairs "
        "(arXiv:2605.20834, misaligned-reference experiment), synthetic task, tiny Llama on CPU.",
        "loss_space": LOSS_SPACE,
        "config": vars(args),
        "results": results,
        "environment": _environment(args),
        "timing_seconds": round(total_seconds, 2),
    }
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump(output, f, indent=2)
    with open(files["table"], "w", encoding="utf-8") as f:
        f.write(table)

    print(table, end="")
    print(f"\nWrote {files['table']}, {files['json']}" + "".join(f", {p}" for p in plots))
    if not plots:
        print("matplotlib is not installed: no plot written (pip install matplotlib).", file=sys.stderr)
    print(f"Total wall time: {total_seconds:.0f} s")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    _check_args(parser, args)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
