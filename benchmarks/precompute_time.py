"""Reference precompute time: trl-cpo's (pairs batched longest first) against TRL's own DPOTrainer precompute.

Both run in one process on the same model weights, the same tokenized pairs and the same batch size:

  trl           `DPOTrainer._precompute_ref_logps` (what `precompute_ref_log_probs=True` runs): batches in dataset
                order and writes its `.arrow` cache next to the dataset's cache files. The dataset is loaded from
                disk (`save_to_disk` + `load_from_disk`), the setup under which TRL's cache works on several
                processes; the cache file is deleted after each timed call so that every call computes.
  ours          `CPOTrainer._precompute_ref_logps` (the whole step the trainer runs: forward passes batched longest
                first, results put back in dataset order, the reference report and the margin column).
  ours_unsorted (with --with_unsorted) `trl_cpo.reference.compute_reference_logps(..., sort_by_length=False)`: the
                forward passes alone in dataset order, to show how much of the difference the sorting makes.

Data: the first 512 pairs of Anthropic's HH-RLHF harmless-base test split (benchmarks/data/, MIT licence in
benchmarks/data/LICENSE-hh-rlhf), mixed-length multi-turn conversations split into an explicit prompt (up to the
last "Assistant:") and the two final answers, less the pairs the trainers' validator refuses (one: an empty chosen
answer), which benchmarks/_data.py skips and names. Model: a randomly initialised Llama (width 256, 4 layers) with a
word-level tokenizer trained on those pairs (`trl_cpo.tiny`), nothing downloaded.

The variants are timed round by round in rotating order, so that machine noise hits them alike; the reported
ratio is the median over rounds of (ours / trl) within each round, in wall-clock time. The same ratio in process
CPU time is printed next to it: on a shared, oversubscribed CPU the wall clock mostly measures the other processes
(run with OMP_NUM_THREADS=1 there, so that CPU time counts work, not spinning threads). The issue's target is a
ratio <= 0.7. The script also prints the padded tokens each order feeds the model (a noise-free count): on a
compute-bound device the time ratio cannot go much below the padded-token ratio.

  OMP_NUM_THREADS=1 python benchmarks/precompute_time.py   # CPU: ~8 CPU-minutes of work, 512 pairs, 3 rounds
  python benchmarks/precompute_time.py --dtype bf16 --json benchmarks/results/precompute_time_gpu.json   # one GPU
  python benchmarks/precompute_time.py --smoke   # seconds on a CPU, not a measurement: 96 pairs, width 64, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import _smoke
from _data import DEFAULT_DATA, load_pairs

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: --smoke's settings (flags given with it still win): the first 96 records reach the one the validator refuses (86).
SMOKE = dict(num_pairs=96, batch_size=8, max_length=256, rounds=1, hidden_size=64, num_layers=2, vocab_size=2000)


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"a smoke run, not a measurement: {SMOKE}")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="HH-RLHF or prompt/chosen/rejected JSON lines (.gz ok)"
    )
    parser.add_argument(
        "--num_pairs", type=int, default=512, help="records read (pairs the validator refuses skipped)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="precompute_ref_batch_size, for both")
    parser.add_argument("--max_length", type=int, default=1024, help="DPOConfig.max_length (TRL's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with_unsorted", action="store_true", help="also time our pass in dataset order")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=8192, help="word-level tokenizer vocabulary")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", help="write all measurements here (e.g. benchmarks/results/precompute_time.json)")
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Token positions the model computes when pairs are batched in `order`: each batch of B pairs is 2B sequences
    padded to the batch's longest (`lengths[i]`: the longer of pair i's two sequences, after truncation)."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        total += 2 * len(batch) * max(lengths[i] for i in batch)
    return total


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    args = _parse(argv)
    if args.smoke:
        _smoke.start(args.json)
    summary = measure(args)
    if args.smoke:
        print(_smoke.banner())
    return summary


def measure(args):
    import torch
    from datasets import Dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_cpo import CPOConfig, CPOTrainer
    from trl_cpo._trl_compat import PRECOMPUTE_METHOD  # DPOTrainer._precompute_ref_logps, which ours overrides
    from trl_cpo.reference import _longest_first, compute_reference_logps
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    loaded = load_pairs(args.data, args.num_pairs)
    print(loaded.summary(), flush=True)
    pairs = loaded.pairs
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = build_tiny_tokenizer(
            [text for pair in pairs for text in pair.values()], vocab_size=args.vocab_size
        )
        model = build_tiny_llama(
            tokenizer,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            intermediate_size=688 if args.hidden_size == 256 else None,  # benchmarks/step_time.py's "small" shape
            max_position_embeddings=max(args.max_length, 512),
        )
        model.to(dtype).save_pretrained(f"{workdir}/model")
        tokenizer.save_pretrained(f"{workdir}/model")
        Dataset.from_list(pairs).save_to_disk(f"{workdir}/data")

        common = dict(
            report_to="none",
            use_cpu=not cuda,
            bf16=args.dtype == "bf16",
            max_length=args.max_length,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.batch_size,
            per_device_train_batch_size=args.batch_size,
            gradient_checkpointing=False,
            disable_tqdm=True,
            beta=2.5,
            loss_type=["sigmoid_norm"],
        )

        def load_model():
            model = AutoModelForCausalLM.from_pretrained(f"{workdir}/model", dtype=dtype)
            return model.to("cuda") if cuda else model

        tok = AutoTokenizer.from_pretrained(f"{workdir}/model")
        # Each constructor runs its trainer's precompute once: that is the untimed warm-up.
        quiet = contextlib.redirect_stdout(io.StringIO())  # our trainer prints its reference report
        with quiet:
            ours = CPOTrainer(
                load_model(),
                # The reference store would answer the warm-up's own entry: time the pass itself.
                args=CPOConfig(output_dir=f"{workdir}/ours", reference_cache=False, **common),
                train_dataset=load_from_disk(f"{workdir}/data"),
                processing_class=tok,
            )
            ours.precompute_reference()  # what train() runs first (DPOTrainer runs it in its constructor)
        trl = DPOTrainer(
            load_model(),
            args=DPOConfig(output_dir=f"{workdir}/trl", **common),
            train_dataset=load_from_disk(f"{workdir}/data"),
            processing_class=tok,
        )
        trl_tokenized = trl.train_dataset.remove_columns(list(REFERENCE_COLUMNS))
        ours_tokenized = ours.train_dataset.remove_columns(list(REFERENCE_COLUMNS))
        if trl_tokenized["prompt_ids"] != ours_tokenized["prompt_ids"]:
            sys.exit("the two trainers tokenized the pairs differently: the comparison would not be fair")
        cache_dir = os.path.dirname(trl_tokenized.cache_files[0]["filename"])
        # Longest of the pair's two sequences after the collator's truncation: what a batch is padded to.
        lengths = [
            min(len(p) + max(len(c), len(r)), args.max_length)
            for p, c, r in zip(
                ours_tokenized["prompt_ids"], ours_tokenized["chosen_ids"], ours_tokenized["rejected_ids"]
            )
        ]
        padded = {
            "dataset_order": padded_tokens(lengths, list(range(len(lengths))), args.batch_size),
            "longest_first": padded_tokens(lengths, _longest_first(ours_tokenized), args.batch_size),
        }

        def run_trl():
            before = set(os.listdir(cache_dir))
            out = getattr(trl, PRECOMPUTE_METHOD)(trl_tokenized, "train", args.batch_size)
            written = set(os.listdir(cache_dir)) - before
            if not written:
                sys.exit("TRL's precompute wrote no new cache file: it read a cached result instead of computing")
            return out, written

        def run_ours():
            with contextlib.redirect_stdout(io.StringIO()):
                # The trainer's train set itself, so the whole train-set step runs (report included).
                return getattr(ours, PRECOMPUTE_METHOD)(ours.train_dataset, "train", args.batch_size), set()

        def run_ours_unsorted():
            return compute_reference_logps(
                ours, ours_tokenized, batch_size=args.batch_size, sort_by_length=False
            ), set()

        runners = {"trl": run_trl, "ours": run_ours, "ours_unsorted": run_ours_unsorted}
        variants = ("trl", "ours", "ours_unsorted") if args.with_unsorted else ("trl", "ours")
        times = {name: [] for name in variants}
        cpu_times = {name: [] for name in variants}
        for round_index in range(args.rounds):
            shift = round_index % len(variants)
            for name in variants[shift:] + variants[:shift]:
                _sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                result, written = runners[name]()
                _sync()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
                for filename in written:  # TRL's cache: removed (untimed) so that the next call computes again
                    os.remove(os.path.join(cache_dir, filename))
                if name == "trl":
                    trl_values = torch.tensor(result["ref_chosen_logps"])
                elif name == "ours":
                    ours_values = torch.tensor(result["ref_chosen_logps"])
            print(
                f"round {round_index + 1}/{args.rounds}: "
                + ", ".join(f"{name} {times[name][-1]:.2f}s" for name in variants),
                flush=True,
            )
        # Same numbers from both precomputes (different padding: float round-off only).
        max_diff = (trl_values - ours_values).abs().max().item()
        max_rel = ((trl_values - ours_values).abs() / trl_values.abs().clamp_min(1e-6)).max().item()

    ratios = [o / t for o, t in zip(times["ours"], times["trl"])]
    cpu_ratios = [o / t for o, t in zip(cpu_times["ours"], cpu_times["trl"])]
    summary = {
        "kind": "smoke" if args.smoke else "measurement",
        "device": _device(),
        "ratio_ours_over_trl": statistics.median(ratios),
        "cpu_time_ratio_ours_over_trl": statistics.median(cpu_ratios),
        "ratio_ours_unsorted_over_trl": (
            statistics.median(o / t for o, t in zip(times["ours_unsorted"], times["trl"]))
            if args.with_unsorted
            else None
        ),
        "padded_tokens": padded,
        "padded_tokens_ratio": padded["longest_first"] / padded["dataset_order"],
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "median_cpu_s": {name: statistics.median(values) for name, values in cpu_times.items()},
        "torch_threads": torch.get_num_threads(),
        "target": 0.7,
        "pairs": len(pairs),
        "pairs_skipped": [{"row": row, "reason": reason} for row, reason in loaded.refused],
        "tokens_per_pair": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
            "truncated_at_max_length": sum(n > args.max_length for n in lengths),
        },
        "max_abs_diff_ref_chosen_logps": max_diff,
        "max_rel_diff_ref_chosen_logps": max_rel,
    }
    print(
        f"\n{'smoke run (not a measurement): ' if args.smoke else ''}device: {summary['device']}; {len(pairs)} "
        f"HH-RLHF pairs (padded pair length {min(lengths)}-{max(lengths)} "
        f"tokens, median {statistics.median(lengths):.0f}), batch {args.batch_size}, max_length {args.max_length}, "
        f"Llama width {args.hidden_size} x {args.num_layers} layers, {args.dtype}, {args.rounds} rounds"
    )
    for name in variants:
        print(
            f"  {name:14s} median {summary['median_s'][name]:.2f}s wall, {summary['median_cpu_s'][name]:.2f}s CPU;"
            f" per round (wall) {[round(t, 2) for t in times[name]]}"
        )
    print(f"ours / trl (median of per-round ratios): {summary['ratio_ours_over_trl']:.3f}  (target <= 0.7)")
    print(f"same in process CPU time:                {summary['cpu_time_ratio_ours_over_trl']:.3f}")
    if args.with_unsorted:
        print(f"ours_unsorted / trl:                     {summary['ratio_ours_unsorted_over_trl']:.3f}")
    print(
        f"padded tokens fed to the model, longest first / dataset order: {padded['longest_first']} / "
        f"{padded['dataset_order']} = {summary['padded_tokens_ratio']:.3f}"
    )
    print(f"max |ours - trl| on ref_chosen_logps: {max_diff:.2e} (relative {max_rel:.2e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {**summary, "args": vars(args), "times_s": times, "cpu_times_s": cpu_times, "ratios": ratios},
                f,
                indent=1,
            )
    return summary


if __name__ == "__main__":
    main()
