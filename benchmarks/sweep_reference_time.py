"""A sweep's reference passes: a 4-value `cpo_gamma` sweep (CPOTrainer) against 4 DPOTrainer runs with 4 betas.

Every run of a sweep precomputes the reference log-probs of the same train set with the same reference. CPOTrainer
looks them up in the reference store (`trl_cpo.reference_store`, keyed by what decides them: weights, token ids,
truncation, precision; not `cpo_gamma` or `beta`), so the first run computes and the others read. DPOTrainer caches
its precompute in a `datasets` cache file whose key includes the prepared dataset's fingerprint.

Timed: the time each run spends in its trainer's precompute (CPOTrainer's `precompute_reference`, run at the start of
`train()`: the store lookup plus the fingerprint, else the reference pass; DPOTrainer's `_precompute_ref_logps`, run
in its constructor), summed over the sweep. Both sweeps use the same model, data (the shipped HH pairs, less those the
validator refuses: benchmarks/_data.py), batch size and max_length; the store is a fresh temporary folder; the two
sweeps alternate run by run (CPO, DPO, CPO, DPO, ...). Target (issue 17): ours / TRL's <= 0.3.

    python benchmarks/sweep_reference_time.py                   # 256 pairs, small Llama, a few minutes on 2 cores
    python benchmarks/sweep_reference_time.py --smoke           # seconds, not a measurement
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import platform
import sys
import time

import _smoke
from _data import save_model_and_pairs

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

GAMMAS = (0.01, 0.05, 0.1, 0.2)
BETAS = (0.05, 0.1, 0.2, 0.5)
SMOKE = dict(num_pairs=48, max_length=128, hidden_size=64, num_layers=2, vocab_size=2000)


def _parse(argv=None):
    parser = _smoke.model_and_pairs_parser(__doc__, SMOKE)
    return _smoke.parse(parser, SMOKE, argv)


def main(argv=None):
    return _smoke.run(_parse(argv), measure, prefix="sweep-")


def measure(args, work: str) -> dict:
    from datasets import Dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_cpo import CPOConfig, CPOTrainer
    from trl_cpo._trl_compat import PRECOMPUTE_METHOD

    loaded = save_model_and_pairs(args, f"{work}/model")
    Dataset.from_list(loaded.pairs).save_to_disk(f"{work}/data")
    tok = AutoTokenizer.from_pretrained(f"{work}/model")
    common = dict(
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=args.max_length,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.batch_size,
        disable_tqdm=True,
        loss_type=["sigmoid_norm"],
    )
    spent = {"ours": [], "trl": []}

    def timed_precompute(cls, key, method):
        original = getattr(cls, method)

        @functools.wraps(original)  # keeps the signature the trainers check
        def wrapper(self, *a, **k):
            start = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                spent[key].append(time.perf_counter() - start)

        return original, wrapper

    restore = {}
    # Ours runs its precompute (store lookup, else the pass) in `precompute_reference`, at the start of train();
    # DPOTrainer in `_precompute_ref_logps`, from its constructor.
    for cls, key, method in ((CPOTrainer, "ours", "precompute_reference"), (DPOTrainer, "trl", PRECOMPUTE_METHOD)):
        restore[cls, method], wrapper = timed_precompute(cls, key, method)
        setattr(cls, method, wrapper)
    try:
        for run, (gamma, beta) in enumerate(zip(GAMMAS, BETAS)):
            with contextlib.redirect_stdout(io.StringIO()):  # our trainer prints its reference report
                CPOTrainer(
                    AutoModelForCausalLM.from_pretrained(f"{work}/model"),
                    args=CPOConfig(output_dir=f"{work}/cpo{run}", cpo_gamma=gamma, **common),
                    train_dataset=load_from_disk(f"{work}/data"),
                    processing_class=tok,
                ).precompute_reference()
            DPOTrainer(
                AutoModelForCausalLM.from_pretrained(f"{work}/model"),
                args=DPOConfig(output_dir=f"{work}/dpo{run}", beta=beta, **common),
                train_dataset=load_from_disk(f"{work}/data"),
                processing_class=tok,
            )
            print(f"run {run + 1}: cpo_gamma {gamma} {spent['ours'][-1]:.2f} s, beta {beta} {spent['trl'][-1]:.2f} s")
    finally:
        for (cls, method), original in restore.items():
            setattr(cls, method, original)
    ours, trl = sum(spent["ours"]), sum(spent["trl"])
    label = "smoke run (not a measurement)" if args.smoke else "measured"
    print(
        f"{label}: {len(loaded.pairs)} pairs, width {args.hidden_size} x {args.num_layers} layers, max_length "
        f"{args.max_length}, CPU ({os.cpu_count()} cores, {platform.machine()})"
    )
    print(
        f"  CPOTrainer, cpo_gamma {list(GAMMAS)}: reference passes {ours:8.2f} s  {[round(s, 2) for s in spent['ours']]}"
    )
    print(
        f"  DPOTrainer, beta {list(BETAS)}:      reference passes {trl:8.2f} s  {[round(s, 2) for s in spent['trl']]}"
    )
    print(f"  sweep reference time, ours / TRL's: {ours / trl:.3f}  (target <= 0.3)")
    return {
        "kind": "smoke" if args.smoke else "measurement",
        "pairs": len(loaded.pairs),
        "ours_s": spent["ours"],
        "trl_s": spent["trl"],
        "ratio": ours / trl,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
