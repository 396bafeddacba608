"""`--smoke`, the same in every benchmark: tiny shapes, a handful of pairs, one round, labelled as not a measurement.

A smoke run goes through a benchmark's code end to end in seconds on a CPU (tests/test_benchmarks.py runs each one),
so the scripts cannot rot between the rare quiet runs that measure. Its numbers say nothing about speed or memory, and
it never writes into benchmarks/results/, where the measurements live.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = (
    "SMOKE RUN (--smoke): tiny shapes, a handful of pairs, 1 round; it checks that the code runs, "
    "its numbers are not a measurement"
)


def start(output: str | Path | None) -> None:
    """What every smoke run does first: refuse an `output` under benchmarks/results/, run torch on one thread unless
    OMP_NUM_THREADS says otherwise (on tiny shapes a second thread only spins, and on a shared machine it waits), and
    print the banner. Call it before torch is imported."""
    refuse_results_dir(output)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(banner(), flush=True)


def banner() -> str:
    """The line a smoke run prints before and after its report."""
    return f"=== {LABEL} ==="


def refuse_results_dir(path: str | Path | None) -> None:
    """Exit if a smoke run was asked to write under benchmarks/results/ (it would pass for a measurement there)."""
    if path is not None and Path(path).resolve().is_relative_to(RESULTS):
        sys.exit(f"--smoke writes no measurement: not writing {path} under {RESULTS} (give a path elsewhere)")


def run(args, measure, prefix: str) -> dict:
    """A benchmark's main: the smoke start and closing banner where `args.smoke`, `measure(args, folder)` in a fresh
    temporary folder with a reference store of its own (never the user's), and its result written to `args.json`."""
    import json
    import tempfile

    if args.smoke:
        start(args.json)
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        os.environ["TRL_CPO_REFERENCE_CACHE"] = os.path.join(work, "reference-store")
        result = measure(args, work)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.smoke:
        print(banner())
    return result


def model_and_pairs_parser(description: str, smoke: dict):
    """The flags of a benchmark that trains a random Llama on the shipped pairs (`_data.save_model_and_pairs`):
    `--smoke` (its help names `smoke`, the values `parse` then sets), data, model shape, batch and `--json`."""
    import argparse

    from _data import DEFAULT_DATA

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"a smoke run, not a measurement: {smoke}")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="HH-RLHF or prompt/chosen/rejected JSON lines")
    parser.add_argument("--num_pairs", type=int, default=256, help="records read (refused pairs skipped)")
    parser.add_argument("--batch_size", type=int, default=8, help="per-device batch and precompute_ref_batch_size")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=8192, help="word-level tokenizer vocabulary")
    parser.add_argument("--json", help="write the measurements here")
    return parser


def parse(parser, smoke: dict, argv=None):
    """`parser.parse_args(argv)`, with `smoke`'s values as defaults under `--smoke`."""
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)
