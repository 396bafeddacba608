"""`trl-cpo demo`: arguments, up-front validation, and the experiment loop (reference SFT, then every method row).

The flow of `main`:

1. parse `DemoArguments` with `trl.TrlParser` (so ``--config demo.yaml`` works) and check them;
2. build the training config of every method row (`build_configs`): the configs' own checks run here, so a bad flag
   (``--ecpoc_tau 0``, ``--beta -1``) fails with one line before anything trains;
3. check the output folder (`prepare_output_dir`): refuse one that holds files unless ``--overwrite_output_dir``, in
   which case the demo's own earlier outputs are deleted first;
4. for each corruption ratio and seed: train the reference by SFT (`task.train_sft`), measure it on held-out pairs,
   then train every row from it and measure each every ``--eval_every`` steps (`HeldOut`); `results.json` is
   rewritten after every row so nothing is lost to an interrupted run;
5. print the tables, then write `table.txt`, the plots and the final `results.json` (`report`).
"""

import contextlib
import copy
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

#: Rows of the experiment: name -> (entry of `trl_cpo.methods.METHODS` or None for TRL's DPOTrainer, settings that
#: differ from the flags, what the row is). Every method row reads its other fields from the flags of the same name.
ROWS: dict[str, tuple[str | None, dict[str, Any], str]] = {
    "DPO": (None, {}, "TRL's own trl.DPOTrainer, loss_type='sigmoid_norm'"),
    "CPO": ("cpo", {"cpo_margin_type": "inverse_prob"}, "CPOTrainer at --cpo_gamma (released 0.05)"),
    "CPO-auto": (
        "cpo",
        {"cpo_margin_type": "inverse_prob"},
        "CPOTrainer with cpo_auto_gamma=--cpo_auto_gamma: cpo_gamma chosen by recommend_cpo_gamma on the train set",
    ),
    "CPO-inverse_logp": (
        "cpo",
        {"cpo_margin_type": "inverse_logp"},
        "CPOTrainer at --cpo_gamma with the released code's 1/logp_ref numerics",
    ),
    "E-CPOC": ("ecpoc", {}, "ECPOCTrainer at --ecpoc_gamma / --ecpoc_tau / --ecpoc_alpha"),
}
LOSS_SPACE = "length-normalized log-probs (mean per completion token, EOS included)"
SWEEP_HINT = "0 0.2 0.4 0.6"
#: Files the demo writes into --output_dir (deleted by --overwrite_output_dir; nothing else ever is).
OUTPUT_FILES = ("results.json", "table.txt", "sweep.png")
OUTPUT_PATTERN = ("curves_corruption-", ".png")


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class DemoArguments:
    """Arguments of `trl-cpo demo` (every field is a flag of the same name, and a key of a ``--config`` YAML)."""

    # -- run ----------------------------------------------------------------------------------------------------------
    corruption: list[float] = field(
        default_factory=lambda: [0.4],
        metadata=_help(
            "Share(s) of the topics (hence pairs) on which the reference imitates the rejected response. Several "
            f"values run a sweep, e.g. --corruption {SWEEP_HINT}."
        ),
    )
    seeds: int = field(
        default=3,
        metadata=_help(
            "Seeds per corruption ratio (--seed, --seed + 1, ...): each draws its own data, reference and training; "
            "every number is reported as the mean with a 95%% t-interval across seeds."
        ),
    )
    seed: int = field(default=0, metadata=_help("First seed."))
    methods: list[str] = field(
        default_factory=lambda: list(ROWS),
        metadata=_help("Rows to train from the reference.", choices=list(ROWS)),
    )
    max_steps: int = field(default=150, metadata=_help("Optimizer steps per row (same budget for all)."))
    per_device_train_batch_size: int = field(default=16, metadata=_help("Preference pairs per step."))
    learning_rate: float = field(default=5e-4, metadata=_help("AdamW learning rate, constant, same for all rows."))
    eval_every: int = field(default=25, metadata=_help("Measure on the held-out pairs every N steps."))
    output_dir: str = field(default="demo_output", metadata=_help("Where the table, plots and JSON are written."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Run even if --output_dir holds files: the demo's own earlier outputs there (results.json, table.txt, "
            "*.png) are deleted first; other files are left alone."
        ),
    )
    num_threads: int = field(
        default=1,
        metadata=_help("torch CPU threads. 1 is fastest for this tiny model and keeps runs reproducible."),
    )
    disable_tqdm: bool = field(default=False, metadata=_help("Hide the progress bars."))

    # -- method hyperparameters ---------------------------------------------------------------------------------------
    beta: float = field(
        default=2.5,
        metadata=_help("Inverse temperature of every row (released CPO setting on length-normalized log-probs)."),
    )
    cpo_gamma: float = field(
        default=0.05, metadata=_help("cpo_gamma of the CPO and CPO-inverse_logp rows (released setting 0.05).")
    )
    cpo_max_margin: float = field(default=10.0, metadata=_help("cpo_max_margin of every CPO row (logit units)."))
    cpo_auto_gamma: float = field(
        default=0.9,
        metadata=_help(
            "Share of the misaligned train pairs the CPO-auto row's cpo_gamma must lift (CPOConfig.cpo_auto_gamma)."
        ),
    )
    ecpoc_gamma: float = field(default=0.5, metadata=_help("E-CPOC floor of the target log-odds."))
    ecpoc_tau: float = field(default=2.0, metadata=_help("E-CPOC smooth-max sharpness."))
    ecpoc_alpha: float = field(default=1.0, metadata=_help("E-CPOC scale 1/ecpoc_alpha of the correction term."))

    # -- synthetic task and reference ---------------------------------------------------------------------------------
    num_topics: int = field(default=20, metadata=_help("Topics; corruption is applied per topic."))
    label_noise: float = field(
        default=0.2,
        metadata=_help("Share of training pairs whose chosen/rejected labels are swapped (annotator disagreement)."),
    )
    ref_noise: float = field(
        default=0.1,
        metadata=_help("Per-word chance that the reference's SFT target uses the other pool: how sure it is."),
    )
    train_pairs: int = field(
        default=2400,
        metadata=_help("Training pairs (also the reference's SFT prompts); 150 steps x 16 pairs sees each once."),
    )
    eval_pairs: int = field(default=500, metadata=_help("Held-out pairs (majority labels), balanced over topics."))
    ref_steps: int = field(default=300, metadata=_help("SFT steps of the reference."))
    ref_learning_rate: float = field(default=3e-3, metadata=_help("SFT learning rate of the reference."))
    ref_batch_size: int = field(default=32, metadata=_help("SFT batch size of the reference."))
    hidden_size: int = field(default=64, metadata=_help("Width of the tiny Llama (a multiple of 4: 4 heads)."))
    num_layers: int = field(default=2, metadata=_help("Layers of the tiny Llama."))

    def __post_init__(self):
        from trl_cpo.losses import check_beta

        for name in (
            "seeds",
            "max_steps",
            "per_device_train_batch_size",
            "eval_every",
            "num_threads",
            "num_topics",
            "train_pairs",
            "eval_pairs",
            "ref_steps",
            "ref_batch_size",
            "hidden_size",
            "num_layers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} {value!r} is invalid: it must be an integer >= 1.")
        if self.hidden_size % 4:
            raise ValueError(f"--hidden_size {self.hidden_size} is invalid: use a multiple of 4 (4 attention heads).")
        self.corruption = [float(c) for c in self.corruption]
        bad = [c for c in self.corruption if not 0 <= c <= 1]
        if bad:
            raise ValueError(f"--corruption {bad} is invalid: each value is a share of the topics, in [0, 1].")
        if len(set(self.corruption)) != len(self.corruption):
            raise ValueError(f"--corruption {self.corruption} lists a value twice; give each ratio once.")
        unknown = [m for m in self.methods if m not in ROWS]
        if unknown:
            raise ValueError(f"--methods {unknown} is invalid: choose among {' '.join(ROWS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods {self.methods} lists a row twice; give each once.")
        for name in ("label_noise", "ref_noise"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"--{name} {getattr(self, name)!r} is invalid: it must be in [0, 0.5).")
        for name in ("learning_rate", "ref_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} {getattr(self, name)!r} is invalid: it must be > 0.")
        try:
            check_beta(self.beta)
        except ValueError as error:
            raise ValueError(f"--{error}") from None

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


class UsageError(ValueError):
    """A user error found before anything trains: `main` prints it on one line and exits with status 2."""


# -- configs ------------------------------------------------------------------------------------------------------------


def row_method(name: str):
    """The `trl_cpo.methods.METHODS` entry of a row (None for DPO)."""
    from trl_cpo.methods import METHODS

    key = ROWS[name][0]
    return None if key is None else METHODS[key]


def row_settings(name: str, args: DemoArguments) -> dict[str, Any]:
    """The method fields of a row's config: the flags of the same name, then the row's own settings."""
    method = row_method(name)
    if method is None:
        return {}
    settings = {f: getattr(args, f) for f in method.fields if hasattr(args, f)}
    settings.update(ROWS[name][1])
    if name == "CPO-auto":
        settings["cpo_auto_gamma"] = args.cpo_auto_gamma
    return settings


def build_config(name: str, args: DemoArguments, *, seed: int, output_dir: str):
    """The training config of row `name` (all rows on length-normalized log-probs, reference log-probs precomputed)."""
    method = row_method(name)
    if method is None:
        from trl import DPOConfig

        config_class = DPOConfig
    else:
        config_class = method.config_class
    return config_class(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        # The new name of gradient_checkpointing (TRL configs default that one to True).
        activation_checkpointing=False,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=args.eval_every,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        beta=args.beta,
        loss_type=["sigmoid_norm"],
        precompute_ref_log_probs=True,
        max_length=None,
        disable_tqdm=True,
        **row_settings(name, args),
    )


def build_configs(args: DemoArguments, output_dir: str = "demo-configs") -> dict[str, Any]:
    """Every row's config, built before anything trains so that their checks reject a bad flag up front.

    Raises `UsageError` with the config's own message (it names the field, which is also the flag).
    """
    configs = {}
    for name in args.methods:
        try:
            configs[name] = build_config(name, args, seed=args.seed, output_dir=output_dir)
        except ValueError as error:
            raise UsageError(f"{error} (row {name})") from None
    return configs


# -- output folder --------------------------------------------------------------------------------------------------------


def _own_outputs(path: str) -> list[str]:
    prefix, suffix = OUTPUT_PATTERN
    return sorted(
        name
        for name in os.listdir(path)
        if name in OUTPUT_FILES or (name.startswith(prefix) and name.endswith(suffix))
    )


def prepare_output_dir(path: str, overwrite: bool) -> list[str]:
    """Check `path` before anything trains; return the earlier demo outputs it deleted.

    A folder that holds files is refused unless `overwrite`; then the demo's own files there (results.json,
    table.txt, the PNGs) are deleted, so no stale figure survives next to new results. Nothing else is touched.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output_dir {path!r} is a file, not a folder; choose another --output_dir.")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            found = _own_outputs(path) or sorted(os.listdir(path))
            raise UsageError(
                f"--output_dir {path!r} already holds files ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}"
                "); pass --overwrite_output_dir to replace the demo's outputs there, or choose an empty --output_dir."
            )
        removed = _own_outputs(path)
        for name in removed:
            os.remove(os.path.join(path, name))
    else:
        removed = []
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"--output_dir {path!r} cannot be written ({error.strerror}); choose another one.") from None
    return removed


# -- measurements -------------------------------------------------------------------------------------------------------


def _mean_or_none(values) -> float | None:
    return round(values.float().mean().item(), 6) if values.numel() else None


def held_out_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> dict[str, float | None]:
    """Preference accuracy, U-fraction and mean policy log-odds on held-out pairs (inputs in the loss's space).

    The ``*_ref_misaligned`` entries restrict to the pairs the reference gets wrong (``delta_ref < 0``), the only ones
    that can lie in U; they are ``None`` when there are none.
    """
    from trl_cpo.metrics import in_undesirable_space, u_fraction

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


def swapped(reference):
    """The same pairs with chosen and rejected exchanged (what a flipped label shows the loss)."""
    from trl_cpo.reference import ReferenceLogps

    return ReferenceLogps(reference.rejected, reference.chosen, reference.rejected_lengths, reference.chosen_lengths)


def row_target(name: str, reference, config):
    """Per-pair target log-odds each row's loss pushes ``delta_pi`` past, in the space of ``config.loss_type``.

    DPO: ``delta_ref``; the methods: `trl_cpo.methods.Method.target_from_config` (what the trainers use), with
    ``config`` as the trainer holds it after training (so CPO-auto's chosen ``cpo_gamma``).
    """
    from trl_cpo.logps import is_length_normalized

    method = row_method(name)
    if method is None:
        return reference.delta_ref(is_length_normalized(config.loss_type))
    return method.target_from_config(reference, config)


def row_targets(name: str, reference, config):
    """(t1, t2): the row's target with the majority label and for the same pair with its label flipped."""
    return row_target(name, reference, config), row_target(name, swapped(reference), config)


def predicted_delta_pi(name: str, reference, config, label_noise: float):
    """Per-pair population optimum of the row's loss under `label_noise` (`optimum.population_optimum`)."""
    from .optimum import population_optimum

    return population_optimum(*row_targets(name, reference, config), beta=config.beta, label_noise=label_noise)


def _monitor_callback(held_out: HeldOut, history: list, eval_every: int, bar):
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


def _bar(total: int, desc: str, disable: bool):
    if disable:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# -- training -----------------------------------------------------------------------------------------------------------


def make_trainer(name: str, model, config, train_dataset, tokenizer):
    """The row's trainer: TRL's DPOTrainer for DPO, the method table's trainer class otherwise."""
    method = row_method(name)
    if method is None:
        from trl import DPOTrainer

        trainer_class = DPOTrainer
    else:
        trainer_class = method.trainer_class
    return trainer_class(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer)


def _trainer_name(trainer) -> str:
    cls = type(trainer)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def train_row(name, config, reference, tokenizer, train_dataset, held_out: HeldOut, args, label) -> dict[str, Any]:
    """Train one row from a copy of `reference`; its held-out history, final numbers, target and prediction."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    history: list[dict] = []
    start = time.perf_counter()
    printed = io.StringIO()
    # The trainers print the reference report at their precompute; it is kept (and shown once) rather than printed
    # once per row and seed.
    with contextlib.redirect_stdout(printed):
        trainer = make_trainer(name, copy.deepcopy(reference), config, train_dataset, tokenizer)
    bar = _bar(total=args.max_steps, desc=f"{label} {name:<16}", disable=args.disable_tqdm)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_monitor_callback(held_out, history, args.eval_every, bar))
    try:
        trainer.train()
    finally:
        if bar is not None:
            bar.close()
    # Read after training: CPO-auto's cpo_gamma is chosen by the trainer at its precompute.
    config = trainer.args
    from .optimum import optimality_residual

    target, target_flipped = row_targets(name, held_out.reference, config)
    predicted = predicted_delta_pi(name, held_out.reference, config, args.label_noise)
    policy_chosen, policy_rejected = held_out.logps(trainer.model)
    residual = optimality_residual(
        policy_chosen - policy_rejected, target, target_flipped, beta=config.beta, label_noise=args.label_noise
    )
    misaligned = held_out.misaligned
    final = {k: v for k, v in history[-1].items() if k != "step"}
    final["mean_target_ref_misaligned"] = _mean_or_none(target[misaligned])
    final["predicted_mean_delta_pi"] = None if predicted is None else _mean_or_none(predicted)
    final["predicted_mean_delta_pi_ref_misaligned"] = (
        None if predicted is None else _mean_or_none(predicted[misaligned])
    )
    final["mean_optimality_residual_ref_misaligned"] = _mean_or_none(residual[misaligned])
    measured, expected = final["mean_delta_pi_ref_misaligned"], final["predicted_mean_delta_pi_ref_misaligned"]
    final["gap_to_predicted_ref_misaligned"] = (
        None if measured is None or expected is None else round(measured - expected, 6)
    )
    # How far single pairs sit from their own optimum (the model moves words shared by many pairs, not each pair).
    gaps = None if predicted is None else (policy_chosen - policy_rejected - predicted)[misaligned]
    final["spread_around_predicted_ref_misaligned"] = (
        round(gaps.std().item(), 6) if gaps is not None and gaps.numel() > 1 else None
    )
    method = row_method(name)
    settings = {} if method is None else method.settings(config)
    if "cpo_gamma" in settings:
        final["cpo_gamma"] = round(float(settings["cpo_gamma"]), 6)
    report = getattr(trainer, "reference_report", None)
    return {
        "trainer": _trainer_name(trainer),
        "hyperparameters": {"beta": config.beta, "loss_type": list(config.loss_type), **settings},
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "final": final,
        "history": history,
        "train_loss": [
            {"step": entry["step"], "loss": round(entry["loss"], 6)}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "reference_report": None if report is None else report.to_dict(),
        "printed_report": printed.getvalue().strip() or None,
        "timing_seconds": round(time.perf_counter() - start, 2),
    }


def train_reference(args: DemoArguments, ratio: float, seed: int, label: str) -> dict[str, Any]:
    """The task's data, tokenizer and corrupted reference for one ratio and seed (everything seeded by `seed`)."""
    import torch

    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    from . import task as task_lib

    task = task_lib.TaskConfig(num_topics=args.num_topics, label_noise=args.label_noise, ref_noise=args.ref_noise)
    train_pairs = task_lib.make_pairs(task, args.train_pairs, seed=seed, label_noise=task.label_noise)
    eval_pairs = task_lib.make_pairs(task, args.eval_pairs, seed=seed + 1_000_003, label_noise=0.0)
    corrupted = task_lib.corrupted_topics(task.num_topics, ratio, seed=seed)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer([" ".join(task.vocabulary())], vocab_size=len(task.vocabulary()) + 10)
    reference = build_tiny_llama(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, max_position_embeddings=64, seed=seed
    )
    sft_items = [
        task_lib.encode(tokenizer, prompt, target)
        for prompt, target in task_lib.reference_sft_examples(task, train_pairs, corrupted, seed=seed)
    ]
    start = time.perf_counter()
    bar = _bar(total=args.ref_steps, desc=f"{label} reference SFT", disable=args.disable_tqdm)

    def on_step(step: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)

    try:
        sft_losses = task_lib.train_sft(
            reference,
            sft_items,
            pad_token_id=tokenizer.pad_token_id,
            steps=args.ref_steps,
            batch_size=args.ref_batch_size,
            learning_rate=args.ref_learning_rate,
            seed=seed,
            on_step=on_step,
        )
    finally:
        if bar is not None:
            bar.close()
    return {
        "task": task,
        "train_pairs": train_pairs,
        "eval_pairs": eval_pairs,
        "corrupted": corrupted,
        "tokenizer": tokenizer,
        "model": reference,
        "sft_final_loss": round(sum(sft_losses[-10:]) / len(sft_losses[-10:]), 6),
        "timing_seconds": round(time.perf_counter() - start, 2),
    }


def run_seed(ratio, seed, args, configs, work_dir, on_row=None) -> dict[str, Any]:
    """Reference SFT for one ratio and seed, then every row from it; all numbers of that seed."""
    from datasets import Dataset

    label = f"corruption {ratio:.2f} seed {seed}:"
    built = train_reference(args, ratio, seed, label)
    held_out = HeldOut(built["tokenizer"], built["eval_pairs"], built["model"])
    delta_ref = held_out.ref_chosen - held_out.ref_rejected
    misaligned = held_out.misaligned
    result = {
        "seed": seed,
        "reference": {
            "corrupted_topics": built["corrupted"],
            "corrupted_share": len(built["corrupted"]) / args.num_topics,
            "misaligned_rate": _mean_or_none(misaligned),
            "accuracy": _mean_or_none(delta_ref > 0),
            "mean_delta_ref": _mean_or_none(delta_ref),
            "mean_delta_ref_misaligned": _mean_or_none(delta_ref[misaligned]),
            "mean_delta_ref_aligned": _mean_or_none(delta_ref[~misaligned]),
            "sft_final_loss": built["sft_final_loss"],
            "timing_seconds": built["timing_seconds"],
        },
        "data": {
            "train_pairs": len(built["train_pairs"]),
            "train_pairs_swapped": sum(p["swapped"] for p in built["train_pairs"]),
            "eval_pairs": len(built["eval_pairs"]),
            "example_pair": {k: built["eval_pairs"][0][k] for k in ("prompt", "chosen", "rejected")},
        },
        "methods": {},
    }
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in built["train_pairs"]]
    train_dataset = Dataset.from_list(rows)
    for name, config in configs.items():
        config = replace(
            config, seed=seed, data_seed=seed, output_dir=os.path.join(work_dir, f"{ratio}-{seed}-{name}")
        )
        result["methods"][name] = train_row(
            name, config, built["model"], built["tokenizer"], train_dataset, held_out, args, label
        )
        if on_row is not None:
            on_row(result)
    return result


@contextlib.contextmanager
def _quiet(num_threads: int, progress: bool):
    """Fix torch's thread count and silence library chatter for the duration of the run, then restore both."""
    import datasets
    import torch
    import transformers

    tqdm_disable = os.environ.get("TQDM_DISABLE")
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"  # TRL's own precompute bar reads it
    threads = torch.get_num_threads()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    # The trainers' report warnings and cpo_auto_gamma's choice are in results.json and the printed report.
    package_logger = logging.getLogger("trl_cpo")
    package_level = package_logger.level
    torch.set_num_threads(num_threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    package_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Library notices about tiny-model configs and CPU-only settings; they say nothing about the results.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        torch.set_num_threads(threads)
        package_logger.setLevel(package_level)
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable
        if bars:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(verbosity)


def run_demo(args: DemoArguments, configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every corruption ratio and seed; print the tables, then write table / plots / JSON under `output_dir`.

    `configs` (from `build_configs`) and the output folder are expected to have been checked already (`main` does);
    `results.json` is rewritten after every row with ``"complete": false`` until the run ends.
    """
    from . import report

    configs = build_configs(args) if configs is None else configs
    start = time.perf_counter()
    output = report.new_output(args, configs)
    json_path = os.path.join(args.output_dir, "results.json")
    with _quiet(args.num_threads, not args.disable_tqdm), tempfile.TemporaryDirectory(prefix="trl-cpo-demo-") as work:
        for ratio in args.corruption:
            entry = {"corruption": ratio, "seeds": []}
            output["results"].append(entry)

            def on_row(seed_result, entry=entry):
                seeds = [s for s in entry["seeds"] if s["seed"] != seed_result["seed"]]
                entry["seeds"] = [*seeds, seed_result]
                output["timing_seconds"] = round(time.perf_counter() - start, 2)
                report.write_json(json_path, output)

            for seed in args.seed_list:
                run_seed(ratio, seed, args, configs, work, on_row=on_row)
            entry["summary"] = report.summarize(entry, args.methods)
    output["complete"] = True
    output["timing_seconds"] = round(time.perf_counter() - start, 2)
    report.finish(output, args)
    return output


def _parse(argv: Sequence[str] | None) -> DemoArguments:
    from trl import TrlParser

    parser = TrlParser(dataclass_types=[DemoArguments], prog="trl-cpo demo", description=DESCRIPTION)
    (args,) = parser.parse_args_and_config(None if argv is None else list(argv))
    return args


DESCRIPTION = (
    "Train DPO (TRL's DPOTrainer), CPO at the default and at the recommended cpo_gamma, CPO with the released "
    "inverse_logp numerics, and E-CPOC on a tiny model on CPU, from a reference that prefers the rejected response on "
    "a share of the pairs; measure over several seeds how many held-out pairs each leaves in the undesirable space U "
    "(delta_ref < delta_pi < 0), next to the optimum each loss predicts. The misaligned-reference experiment of "
    "arXiv:2605.20834 at small scale, offline. CPO here is Constrained Preference Optimization, not TRL's "
    "Contrastive Preference Optimization. Every flag is also a key of a --config YAML."
)


def main(argv: Sequence[str] | None = None) -> int:
    """`trl-cpo demo [flags]`; returns the exit status (2 for a user error, reported on one line)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    try:
        try:
            args = _parse(argv)
        except SystemExit as exit_:
            # argparse has printed its one-line error (unknown choice, bad type); --help exits 0 as usual.
            if exit_.code in (0, None):
                raise
            return 2
        configs = build_configs(args)
        removed = prepare_output_dir(args.output_dir, args.overwrite_output_dir)
    except (ValueError, OSError) as error:
        print(f"trl-cpo demo: error: {error}", file=sys.stderr)
        return 2
    if removed:
        print(f"--overwrite_output_dir: deleted the earlier {', '.join(removed)} in {args.output_dir}.")
    run_demo(args, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
