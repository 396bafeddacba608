"""Seconds from `train(resume_from_checkpoint=...)` to the first training step: with and without a reference pass.

A CPOTrainer run on the shipped HH pairs (less those the validator refuses: benchmarks/_data.py) saves a checkpoint;
then two resumes from it are timed, from the `train()` call to the start of the first step (a callback's
`on_step_begin`):

    no pass     the checkpoint as saved: its reference log-probs are checked against the pairs' digests and used,
                with no reference forward (what every matching resume does now)
    one pass    the same checkpoint without its reference file (trl_cpo_reference.safetensors): the reference is
                computed again before the first step, as every resume did when the precompute ran in the
                constructor and was compared with the checkpoint's afterwards

The reference store is off in both (`reference_cache=False`), so the pass is really run. Both resumes construct the
trainer outside the timed span; the resumes alternate for `--rounds` rounds and the medians are printed.

    python benchmarks/resume_time.py            # 256 pairs, small Llama, a few minutes on 2 cores
    python benchmarks/resume_time.py --smoke    # seconds, not a measurement
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import time

import _smoke
from _data import save_model_and_pairs

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

SMOKE = dict(num_pairs=48, max_length=128, hidden_size=64, num_layers=2, vocab_size=2000, rounds=1)


def _parse(argv=None):
    parser = _smoke.model_and_pairs_parser(__doc__, SMOKE)
    parser.add_argument("--rounds", type=int, default=3)
    return _smoke.parse(parser, SMOKE, argv)


def main(argv=None):
    return _smoke.run(_parse(argv), measure, prefix="resume-")


def measure(args, work: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl_cpo import CPOConfig, CPOTrainer
    from trl_cpo.reference_store import REFERENCE_FILE

    loaded = save_model_and_pairs(args, f"{work}/m")
    tok = AutoTokenizer.from_pretrained(f"{work}/m")
    dataset = Dataset.from_list(loaded.pairs)

    def config(output_dir, max_steps):
        return CPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=False,
            report_to="none",
            disable_tqdm=True,
            max_length=args.max_length,
            per_device_train_batch_size=args.batch_size,
            precompute_ref_batch_size=args.batch_size,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            reference_cache=False,
        )

    def trainer(output_dir, max_steps):
        with contextlib.redirect_stdout(io.StringIO()):  # the reference report
            return CPOTrainer(
                AutoModelForCausalLM.from_pretrained(f"{work}/m"),
                args=config(output_dir, max_steps),
                train_dataset=dataset,
                processing_class=tok,
            )

    trainer(f"{work}/run", 1).train()

    class FirstStep(TrainerCallback):
        def __init__(self):
            self.at = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.at is None:
                self.at = time.perf_counter()
                control.should_training_stop = True

    def resume(with_reference: bool) -> float:
        folder = f"{work}/resume-{'ref' if with_reference else 'noref'}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(f"{work}/run", folder)
        if not with_reference:
            os.remove(f"{folder}/checkpoint-1/{REFERENCE_FILE}")
        resumed = trainer(folder, 2)
        resumed.args.save_strategy = "no"
        first = FirstStep()
        resumed.add_callback(first)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            resumed.train(resume_from_checkpoint=f"{folder}/checkpoint-1")
        return first.at - start

    times = {"no pass": [], "one pass": []}
    for _ in range(args.rounds):
        times["no pass"].append(resume(True))
        times["one pass"].append(resume(False))
    medians = {name: statistics.median(values) for name, values in times.items()}
    label = "smoke run (not a measurement)" if args.smoke else "measured"
    print(
        f"{label}: {len(loaded.pairs)} pairs, width {args.hidden_size} x {args.num_layers} layers, max_length "
        f"{args.max_length}, CPU ({os.cpu_count()} cores, {platform.machine()}), {args.rounds} rounds"
    )
    print(f"  train(resume) -> first step, checkpoint with its reference:    {medians['no pass']:8.2f} s")
    print(f"  train(resume) -> first step, reference recomputed (one pass):  {medians['one pass']:8.2f} s")
    print(f"  resume time, no pass / one pass: {medians['no pass'] / medians['one pass']:.3f}")
    return {"kind": "smoke" if args.smoke else "measurement", "pairs": len(loaded.pairs), "seconds": times}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
