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
