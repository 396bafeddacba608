"""Per-step training time and peak memory of CPOTrainer, ECPOCTrainer and DPOTrainer, printed as ratios.

Trainers compared (same model, data, batch and log-prob space: length-normalized):
  cpo            CPOTrainer (reference log-probs precomputed before training; the margin computed in the loss step)
  cpo_live       CPOTrainer, precompute_ref_log_probs=False (DPOTrainer's live reference forward at every step)
  ecpoc          ECPOCTrainer (same)
  dpo_precomp    DPOTrainer, loss_type=sigmoid_norm, precompute_ref_log_probs=True
  dpo_live       DPOTrainer, loss_type=sigmoid_norm, reference forward at every step

Each measurement runs one trainer in a fresh subprocess (so peak memory is that trainer's alone), and the trainers
are interleaved round by round in rotating order, so machine noise hits all of them alike. A round times `--steps`
optimizer steps after `--warmup` untimed ones; ratios use the median step time over all rounds.

Targets: cpo and ecpoc <= 1.03x dpo_precomp and <= 0.85x dpo_live in step time (issue 2), cpo_live <= 1.03x dpo_live
(issue 16); peak memory <= DPO's.

  python benchmarks/step_time.py                      # CPU, small Llama (a few minutes on 2 cores)
  python benchmarks/step_time.py --shape llama3-8b --dtype bf16 --per_device_train_batch_size 2 --seq 1024  # one GPU
  python benchmarks/step_time.py --shape llama3-8b --load_in_4bit --lora \
      --per_device_train_batch_size 2 --seq 1024                                           # QLoRA on one GPU
  python benchmarks/step_time.py --smoke              # seconds on a CPU: not a measurement (see below)

--smoke: the tiny shape, 2 pairs x 32 tokens, 1 warm-up + 2 timed steps, 1 round, and the trainers run in this
process (a fresh interpreter per trainer would take most of the time), so its memory ratios are not computed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import _smoke

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

TRAINERS = ("cpo", "ecpoc", "cpo_live", "dpo_precomp", "dpo_live")
SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 4, 128, None),
    "small": (256, 4, 4, 4, 688, 8192),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
}
#: --smoke's settings (flags given with it still win).
SMOKE = dict(shape="tiny", per_device_train_batch_size=2, seq=32, steps=2, warmup=1, rounds=1)


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"a smoke run, not a measurement: {SMOKE}")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--num_layers", type=int, help="override the shape's layer count (e.g. to fit one GPU)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="per-device pairs per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per prompt+completion")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--load_in_4bit", action="store_true", help="NF4 base model (needs --lora)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (reference = adapter-free base)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--json", help="write all measurements here")
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def _build_assets(args, workdir):
    """Save one model, tokenizer and dataset that every child loads, so all trainers see the same inputs."""
    import torch
    from datasets import Dataset

    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    words = [f"w{i}" for i in range(500)]
    tokenizer = build_tiny_tokenizer(words)
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[args.shape]
    layers = args.num_layers or layers
    model = build_tiny_llama(
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=max(2 * args.seq, 512),
    )
    model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).save_pretrained(f"{workdir}/model")
    tokenizer.save_pretrained(f"{workdir}/model")
    rng = random.Random(0)
    half = args.seq // 2
    n_pairs = args.per_device_train_batch_size * (args.steps + args.warmup)
    rows = [
        {
            "prompt": " ".join(rng.choices(words, k=half)),
            "chosen": " " + " ".join(rng.choices(words, k=half - 1)),
            "rejected": " " + " ".join(rng.choices(words, k=half - rng.randint(1, half // 4))),
        }
        for _ in range(n_pairs)
    ]
    Dataset.from_list(rows).save_to_disk(f"{workdir}/data")


def _child(args):
    """Train one trainer for warmup + steps and print its step times and peak memory as JSON."""
    print("RESULT " + json.dumps(run_trainer(args)), flush=True)


def run_trainer(args):
    """Train `args.child` on the model and data in `args.workdir` for warmup + steps; its step times and memory."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trl_cpo.methods import METHODS
    from trl_cpo.trainers import TRAINERS

    cuda = torch.cuda.is_available()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    load_kwargs = {"dtype": dtype}
    if args.load_in_4bit:
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    if cuda:
        load_kwargs["device_map"] = {"": 0}
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(f"{args.workdir}/model", **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(f"{args.workdir}/model")
    dataset = load_from_disk(f"{args.workdir}/data")
    common = dict(
        output_dir=f"{args.workdir}/out-{args.child}",
        report_to="none",
        use_cpu=not cuda,
        bf16=args.dtype == "bf16",
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-6,
        logging_steps=10**6,
        save_strategy="no",
        gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.seq + 8,
        beta=2.5,
        loss_type=["sigmoid_norm"],
        seed=0,
    )
    ref_model = None
    if args.child.removesuffix("_live") in METHODS:  # cpo, ecpoc, cpo_live: the method's trainer, default fields
        method = METHODS[args.child.removesuffix("_live")]
        live = args.child.endswith("_live")
        cls, config = TRAINERS[method.name], method.config_class(**common, precompute_ref_log_probs=not live)
        if live and not args.lora:
            ref_model = AutoModelForCausalLM.from_pretrained(f"{args.workdir}/model", **load_kwargs)
    else:
        precompute = args.child == "dpo_precomp"
        cls, config = DPOTrainer, DPOConfig(**common, precompute_ref_log_probs=precompute)
        if not precompute and not args.lora:
            ref_model = AutoModelForCausalLM.from_pretrained(f"{args.workdir}/model", **load_kwargs)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = cls(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # training peak, after the (one-off) precompute
    trainer.train()
    step_times = timer.times[args.warmup :]
    result = {
        "trainer": args.child,
        "step_times": step_times,
        "pairs_per_step": args.per_device_train_batch_size,
        "peak_mem_mib": (torch.cuda.max_memory_allocated() if cuda else 0) / 2**20,
        "peak_rss_over_baseline_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024,
        "tokens_per_step": _tokens_per_step(trainer, args),
    }
    return result


def _tokens_per_step(trainer, args):
    data = trainer.train_dataset
    lengths = [
        len(p) * 2 + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    ]
    return statistics.mean(lengths) * args.per_device_train_batch_size


def _child_flags(args):
    flags = []
    for name, value in vars(args).items():
        if name in ("json", "child", "workdir") or value is None or value is False:
            continue
        flags += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return flags


def main(argv=None):
    args = _parse(argv)
    if args.child:
        return _child(args)
    if args.load_in_4bit and not args.lora:
        sys.exit("--load_in_4bit trains a LoRA adapter: add --lora")
    if args.smoke:
        _smoke.start(args.json)
    # A smoke run trains the trainers in this process: a fresh interpreter per trainer would take most of its time.
    runs = measure(args, in_process=args.smoke)
    report(args, runs, per_trainer_memory=not args.smoke)
    if args.smoke:
        print(_smoke.banner())


def measure(args, in_process=False):
    """Every trainer for `args.rounds` rounds, interleaved: {trainer: [one `run_trainer` result per round]}.

    Each run is a fresh subprocess, so that peak memory is that trainer's alone. `in_process` runs them in this
    process instead (for smoke runs, where the interpreter start-up would dominate; memory figures are then not
    per trainer, and what the trainers print is dropped). A failed run raises `RuntimeError` with the child's output.
    """
    import argparse

    with tempfile.TemporaryDirectory() as workdir:
        _build_assets(args, workdir)
        runs = {name: [] for name in TRAINERS}
        for round_index in range(args.rounds):
            order = TRAINERS[round_index % len(TRAINERS) :] + TRAINERS[: round_index % len(TRAINERS)]
            for name in order:
                if in_process:  # the trainers' own printing (reference report, logs) is dropped, as from a child
                    with contextlib.redirect_stdout(io.StringIO()):
                        result = run_trainer(argparse.Namespace(**{**vars(args), "child": name, "workdir": workdir}))
                    runs[name].append(result)
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", workdir]
                    cmd += _child_flags(args)
                    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        raise RuntimeError(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
                    runs[name].append(json.loads(line[len("RESULT ") :]))
                print(
                    f"round {round_index + 1}/{args.rounds} {name:12s} median step "
                    f"{statistics.median(runs[name][-1]['step_times']):.4f}s",
                    flush=True,
                )
    return runs


def summarize(runs):
    """Per trainer: median step time over all rounds, tokens/s at that median, and the peak memory over rounds."""
    summary = {}
    for name, results in runs.items():
        times = [t for r in results for t in r["step_times"]]
        median = statistics.median(times)
        summary[name] = {
            "median_step_s": median,
            "tokens_per_s": results[0]["tokens_per_step"] / median,
            "peak_gpu_mib": max(r["peak_mem_mib"] for r in results),
            "peak_rss_over_baseline_mib": max(r["peak_rss_over_baseline_mib"] for r in results),
        }
    return summary


def device_name():
    import platform

    import torch

    return (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )


def report(args, runs, per_trainer_memory=True):
    """Print the table of medians and ratios (memory ratios "n/a" when the trainers shared one process); write
    `args.json`. Returns the summary."""
    import torch

    summary = summarize(runs)
    device = device_name()
    print(
        f"\n{'smoke run (not a measurement): ' if args.smoke else ''}device: {device}; shape {args.shape}, "
        f"dtype {args.dtype}, 4bit {args.load_in_4bit}, lora {args.lora}, "
        f"batch {args.per_device_train_batch_size} pairs x {args.seq} tokens, {args.rounds} rounds x {args.steps} "
        "timed steps"
    )
    mem_key = "peak_gpu_mib" if torch.cuda.is_available() else "peak_rss_over_baseline_mib"
    print(
        f"{'trainer':12s} {'step s':>9s} {'tokens/s':>10s} {'peak MiB':>10s} {'time/dpo_precomp':>17s} "
        f"{'time/dpo_live':>14s} {'mem/dpo_precomp':>16s} {'mem/dpo_live':>13s}"
    )
    for name, s in summary.items():
        mem_ratios = [s[mem_key] / max(summary[base][mem_key], 1e-9) for base in ("dpo_precomp", "dpo_live")]
        if not per_trainer_memory:  # the process's RSS growth so far, not this trainer's: no ratio to claim
            mem_ratios = [math.nan, math.nan]
        print(
            f"{name:12s} {s['median_step_s']:9.4f} {s['tokens_per_s']:10.1f} {s[mem_key]:10.1f} "
            f"{s['median_step_s'] / summary['dpo_precomp']['median_step_s']:17.3f} "
            f"{s['median_step_s'] / summary['dpo_live']['median_step_s']:14.3f} "
            f"{mem_ratios[0]:16.3f} {mem_ratios[1]:13.3f}"
        )
    if not per_trainer_memory:
        print("(trainers ran in one process: peak MiB is that process's RSS growth, so memory ratios are nan)")
    if args.json:
        with open(args.json, "w") as f:
            kind = "smoke" if args.smoke else "measurement"
            json.dump(
                {"kind": kind, "device": device, "args": vars(args), "summary": summary, "runs": runs}, f, indent=1
            )
    return summary


if __name__ == "__main__":
    main()
