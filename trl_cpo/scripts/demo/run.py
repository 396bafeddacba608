"""`trl-cpo demo`: the experiment loop (reference SFT, then every row) and the command's `main`.

The flow of `main`:

1. parse `args.DemoArguments` with `trl.TrlParser` (so ``--config demo.yaml`` works) and check them;
2. build the training config of every row (`args.build_configs`): the configs' own checks run here, so a bad flag
   (``--ecpoc_tau 0``, ``--beta -1``) fails with one line before anything trains;
3. check the output folder (`args.prepare_output_dir`): refuse one that holds files unless
   ``--overwrite_output_dir``, in which case the demo's own earlier outputs are deleted first;
4. for each corruption ratio and seed: train the reference by SFT (`task.train_sft`), measure it on held-out pairs,
   then train every row (`rows`) from it and measure each every ``--eval_every`` steps (`measure.HeldOut`);
   `results.json` is rewritten after every row (``"complete": false``), so an interrupted run (Ctrl-C) keeps the
   rows it finished; a run that fails removes the files it wrote, which would block the next run into the folder;
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
from dataclasses import replace
from typing import Any

from . import report
from . import task as task_lib
from .args import DemoArguments, build_configs, prepare_output_dir, remove_outputs
from .measure import HeldOut, mean_or_none
from .rows import make_trainer, predicted_delta_pi, row_method, row_targets


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


def _trainer_name(trainer) -> str:
    cls = type(trainer)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def train_row(name, config, reference, tokenizer, train_dataset, held_out: HeldOut, args, label) -> dict[str, Any]:
    """Train one row from a copy of `reference`; its held-out history, final numbers, target and prediction."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    history: list[dict] = []
    start = time.perf_counter()
    # The trainers print the reference report at their precompute; it is kept (`printed_report`: the same
    # `format_table()`, shown once) rather than printed once per row and seed.
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = make_trainer(name, copy.deepcopy(reference), config, train_dataset, tokenizer)
        if hasattr(trainer, "precompute_reference"):  # CPO / E-CPOC: compute (and print) it now, not in train()
            trainer.precompute_reference()
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
    final["mean_target_ref_misaligned"] = mean_or_none(target[misaligned])
    final["predicted_mean_delta_pi"] = None if predicted is None else mean_or_none(predicted)
    final["predicted_mean_delta_pi_ref_misaligned"] = (
        None if predicted is None else mean_or_none(predicted[misaligned])
    )
    final["mean_optimality_residual_ref_misaligned"] = mean_or_none(residual[misaligned])
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
    trainer_report = getattr(trainer, "reference_report", None)
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
        "reference_report": None if trainer_report is None else trainer_report.to_dict(),
        "printed_report": None if trainer_report is None else trainer_report.format_table(),
        "timing_seconds": round(time.perf_counter() - start, 2),
    }


def train_reference(args: DemoArguments, ratio: float, seed: int, label: str) -> dict[str, Any]:
    """The task's data, tokenizer and corrupted reference for one ratio and seed (everything seeded by `seed`)."""
    import torch

    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

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
            "misaligned_rate": mean_or_none(misaligned),
            "accuracy": mean_or_none(delta_ref > 0),
            "mean_delta_ref": mean_or_none(delta_ref),
            "mean_delta_ref_misaligned": mean_or_none(delta_ref[misaligned]),
            "mean_delta_ref_aligned": mean_or_none(delta_ref[~misaligned]),
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
    configs = build_configs(args) if configs is None else configs
    start = time.perf_counter()
    output = report.new_output(args, configs)
    json_path = os.path.join(args.output_dir, "results.json")
    try:
        with (
            _quiet(args.num_threads, not args.disable_tqdm),
            tempfile.TemporaryDirectory(prefix="trl-cpo-demo-") as work,
        ):
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
    except KeyboardInterrupt:
        if os.path.isfile(json_path):
            print(
                f'trl-cpo demo: interrupted; the rows it finished are in {json_path} ("complete": false). Another run '
                f"into {args.output_dir} needs --overwrite_output_dir (or another --output_dir).",
                file=sys.stderr,
            )
        raise
    except BaseException:
        # The folder held none of the demo's files when the run started (`prepare_output_dir`): what is there now is
        # this run's, and would block the next run.
        removed = remove_outputs(args.output_dir)
        if removed:
            print(
                f"trl-cpo demo: the run failed; removed its partial {', '.join(removed)} from {args.output_dir}, so "
                "the next run can use that folder.",
                file=sys.stderr,
            )
        raise
    return output


def _parse(argv: Sequence[str] | None) -> DemoArguments:
    from trl import TrlParser

    parser = TrlParser(dataclass_types=[DemoArguments], prog="trl-cpo demo", description=DESCRIPTION)
    (args,) = parser.parse_args_and_config(None if argv is None else list(argv))
    return args


def _config_path(argv: Sequence[str] | None) -> str | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    index = argv.index("--config") if "--config" in argv else -1
    return argv[index + 1] if 0 <= index < len(argv) - 1 else None


DESCRIPTION = (
    "Train DPO (TRL's DPOTrainer), CPO at the default and at the recommended cpo_gamma, CPO with the released "
    "inverse_logp numerics, E-CPOC and HyPO (E-CPOC's hard limit, the released code's default) on a tiny model on "
    "CPU, from a reference that prefers the rejected response on "
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
        removed = prepare_output_dir(args.output_dir, args.overwrite_output_dir, {"--config": _config_path(argv)})
    except (ValueError, OSError) as error:
        print(f"trl-cpo demo: error: {error}", file=sys.stderr)
        return 2
    if removed:
        print(f"--overwrite_output_dir: deleted the earlier {', '.join(removed)} in {args.output_dir}.")
    run_demo(args, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
