"""One reference pass: time of `trl-cpo audit` + a training run's start, with and without the reference store.

The audit runs the reference over the train set and writes its log-probs into the reference store
(`trl_cpo.reference_store`; here a temporary folder). A training run then either runs the reference again (its
precompute, `reference_cache=False`) or finds the audit's entry in the store without being told, after computing
its fingerprint.
Training steps are identical in both cases, so what is timed is the audit and the trainer's construction (model load,
tokenization, precompute or file read + fingerprint), which is where the two pipelines differ:

    pipeline A (two passes) = audit + trainer construction with its own precompute
    pipeline B (one pass)   = audit + trainer construction reading the audit's store entry

Constructions alternate A, B, A, B, ... (`--rounds` each, after the audit has tokenized the data once, so both see the
same `datasets` cache) and the medians are reported, with the time spent in the reference forward passes
(`compute_reference_logps`) and in the fingerprint, measured inside the same runs.

Data: by default the shipped HH-RLHF pairs of benchmarks/data/ (first `--pairs` records, split into an explicit prompt
and the two final answers, less the pairs the trainers' validator refuses: benchmarks/_data.py, shared with
precompute_time.py); `--data FILE` reads another JSON-lines file the same way, `--data synthetic` makes random pairs.

    python benchmarks/one_pass_time.py --pairs 256
    python benchmarks/one_pass_time.py --smoke    # seconds on a CPU, not a measurement: 96 pairs, width 64, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import _smoke
from _data import DEFAULT_DATA, load_pairs

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

SHAPES = {"tiny": (64, 2, 4, 128), "small": (256, 4, 4, 688)}  # hidden, layers, heads, intermediate
#: --smoke's settings (flags given with it still win): the first 96 records reach the one the validator refuses (86).
SMOKE = dict(pairs=96, shape="tiny", max_length=256, batch=8, rounds=1)


def _rows(path: str, pairs: int) -> list[dict]:
    if path == "synthetic":
        rng = random.Random(0)
        words = "red blue green small big cat dog bird runs sleeps eats fast slow happy sad the a is very not".split()
        return [
            {
                "prompt": " ".join(rng.choices(words, k=rng.randint(5, 40))),
                "chosen": " " + " ".join(rng.choices(words, k=rng.randint(5, 120))),
                "rejected": " " + " ".join(rng.choices(words, k=rng.randint(5, 120))),
            }
            for _ in range(pairs)
        ]
    loaded = load_pairs(path, pairs)
    print(loaded.summary(), flush=True)
    return loaded.pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"a smoke run, not a measurement: {SMOKE}")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="HH-RLHF or prompt/chosen/rejected JSON lines (.gz ok), or synthetic"
    )
    parser.add_argument("--pairs", type=int, default=256, help="records read (pairs the validator refuses skipped)")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="precompute_ref_batch_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the measurements here")
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    if args.smoke:
        _smoke.start(args.json)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="one-pass-") as work:
        os.environ["TRL_CPO_REFERENCE_CACHE"] = os.path.join(work, "reference-store")  # not the user's cache
        result = measure(args, work)
    if args.smoke:
        print(_smoke.banner())
    return result


def measure(args, work: str) -> dict:
    """Audit once in `work`, then construct the trainer `args.rounds` times each way; print and return the timings."""
    import torch

    import trl_cpo.precompute as precompute
    from trl_cpo import CPOConfig, CPOTrainer
    from trl_cpo.scripts import audit
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    hidden, layers, heads, intermediate = SHAPES[args.shape]
    rows = _rows(args.data, args.pairs)
    data = os.path.join(work, "pairs.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: r[k] for k in r if k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows)
    texts = [r.get("prompt", "") + r["chosen"] + r["rejected"] for r in rows]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=8192)
    model_dir = os.path.join(work, "model")
    build_tiny_llama(
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max(args.max_length, 512),
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train = dict(
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        max_length=args.max_length,
        precompute_ref_batch_size=args.batch,
        report_to="none",
    )
    config = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": os.path.join(work, "audit"),
        **train,
    }
    config_file = os.path.join(work, "train.yaml")
    with open(config_file, "w") as f:
        json.dump(config, f)  # JSON is YAML

    # Time spent in the reference forward passes and in the fingerprint, whoever calls them.
    spent = {"forward": 0.0, "fingerprint": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    precompute.compute_reference_logps = timed("forward", precompute.compute_reference_logps)
    precompute.reference_fingerprint = timed("fingerprint", precompute.reference_fingerprint)

    start = time.perf_counter()
    assert audit.main(["--config", config_file]) == 0
    audit_s = time.perf_counter() - start
    audit_forward_s = spent["forward"]

    from datasets import load_dataset

    def construct(reuse: bool) -> dict:
        spent.update(forward=0.0, fingerprint=0.0)
        dataset = load_dataset("json", data_files=data, split="train")
        start = time.perf_counter()
        trainer = CPOTrainer(
            model=model_dir,
            args=CPOConfig(
                output_dir=os.path.join(work, "train"),
                # reuse: the audit's entry in the reference store, found without being told; recompute: store off
                reference_cache=reuse,
                model_init_kwargs={"dtype": "float32"},
                **train,
            ),
            train_dataset=dataset,
        )
        trainer.precompute_reference()  # what train() runs before the first step
        return {"total_s": time.perf_counter() - start, **{f"{k}_s": v for k, v in spent.items()}}

    runs = {"recompute": [], "reuse": []}
    for _ in range(args.rounds):
        for mode in ("recompute", "reuse"):
            runs[mode].append(construct(mode == "reuse"))

    def median(mode, key):
        return statistics.median(run[key] for run in runs[mode])

    recompute, reuse = median("recompute", "total_s"), median("reuse", "total_s")
    result = {
        "kind": "smoke" if args.smoke else "measurement",
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "data": args.data,
        "pairs": len(rows),
        "shape": args.shape,
        "max_length": args.max_length,
        "precompute_ref_batch_size": args.batch,
        "rounds": args.rounds,
        "audit_s": audit_s,
        "audit_forward_s": audit_forward_s,
        "train_start_recompute_s": recompute,
        "train_start_reuse_s": reuse,
        "train_recompute_forward_s": median("recompute", "forward_s"),
        "train_reuse_fingerprint_s": median("reuse", "fingerprint_s"),
        "pipeline_two_passes_s": audit_s + recompute,
        "pipeline_one_pass_s": audit_s + reuse,
        "runs": runs,
    }
    result["one_pass_over_two_passes"] = result["pipeline_one_pass_s"] / result["pipeline_two_passes_s"]
    result["saving_fraction"] = 1 - result["one_pass_over_two_passes"]
    print(
        f"{'smoke run (not a measurement): ' if args.smoke else ''}"
        f"{result['pairs']} pairs, {args.shape} Llama, max_length {args.max_length}, {result['device']}:\n"
        f"  audit                                   {audit_s:7.1f} s  (reference forward {audit_forward_s:.1f} s)\n"
        f"  training start, own precompute          {recompute:7.1f} s  "
        f"(reference forward {result['train_recompute_forward_s']:.1f} s)\n"
        f"  training start, from the audit's entry  {reuse:7.1f} s  "
        f"(fingerprint {result['train_reuse_fingerprint_s']:.2f} s, no forward)\n"
        f"  audit + training start: {result['pipeline_two_passes_s']:.1f} s -> {result['pipeline_one_pass_s']:.1f} s "
        f"({result['saving_fraction']:.0%} less)\n"
        f"  one pass / two passes (audit + training start): {result['one_pass_over_two_passes']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
