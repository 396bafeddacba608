"""Step cost of the training diagnostics (issue 19): per-step time with them against without, printed as ratios.

Two trainers (same model, data, batch and log-prob space: length-normalized; reference log-probs precomputed):
  cpo   CPOTrainer: steps with every diagnostic (trl_cpo.diagnostics.STEP_METRICS) against steps logging only
        u_fraction and ref_misaligned_fraction (what it logged before issue 19)
  dpo   DPOTrainer: steps through DiagnosticsCallback's compute_loss against steps through DPOTrainer's own

Both kinds of step alternate within one training run (A B B A A B B A ...), so a busy machine slows both alike: the
ratio compares neighbouring steps, not runs minutes apart. Ratios: median step time with / without, in wall-clock and
in process CPU time, and the median over neighbouring pairs of steps of their wall-clock ratio. The time spent in the diagnostics' own code (`step_metrics`, and for the callback its whole
`_log_step`) is timed too, as a share of the median step.

The diagnostics are read from tensors the step already has (no extra forward): a few small tensor operations, a gather
and one device-to-host copy per micro-batch. Per-pair files (`pair_diagnostics`) cost a forward over a split at the end
of training, not step time, and are off here. Target: both ratios <= 1.01 on CPU.

  python benchmarks/diagnostics_cost.py              # CPU, small Llama (about 10 minutes on 2 busy cores)
  python benchmarks/diagnostics_cost.py --smoke      # seconds: not a measurement
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time

import _smoke

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

TRAINERS = ("cpo", "dpo")
LABELS = {
    "cpo": "CPOTrainer step time, with / without the new diagnostics:",
    "dpo": "DPOTrainer step time, with / without DiagnosticsCallback:",
}
#: Which kind of step each position of the repeating pattern is (True: with the diagnostics).
PATTERN = (True, False, False, True)
SMOKE = dict(shape="tiny", per_device_train_batch_size=2, seq=32, steps=4, warmup=1)


def _parse(argv=None):
    import step_time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"a smoke run, not a measurement: {SMOKE}")
    parser.add_argument("--shape", choices=step_time.SHAPES, default="small")
    parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per prompt+completion")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind (with, without) per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--json", help="write all measurements here")
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    args.num_layers, args.dtype = None, "fp32"  # what step_time's asset builder reads
    return args


def run_trainer(name: str, args, workdir: str) -> dict[str, list[float]]:
    """Train `name` for warmup + 2 * steps steps on the model and data in `workdir`, with and without the diagnostics
    in the alternating pattern; the timed steps' wall and CPU times and the time in the diagnostics' code, by kind."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import trl_cpo._margin_trainer as margin_trainer
    from trl_cpo import CPOConfig, CPOTrainer, DiagnosticsCallback, diagnostics

    common = dict(
        output_dir=f"{workdir}/out-{name}",
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.warmup + 2 * args.steps,
        learning_rate=1e-6,
        logging_steps=10**6,
        save_strategy="no",
        max_length=args.seq + 8,
        beta=2.5,
        loss_type=["sigmoid_norm"],
        seed=0,
        precompute_ref_log_probs=True,
    )
    model = AutoModelForCausalLM.from_pretrained(f"{workdir}/model")
    tokenizer = AutoTokenizer.from_pretrained(f"{workdir}/model")
    data = dict(train_dataset=load_from_disk(f"{workdir}/data"), processing_class=tokenizer)
    times = {kind: {"wall": [], "cpu": [], "in_diagnostics": []} for kind in ("with", "without")}
    inside = []  # seconds in the diagnostics' code during the current step

    def timed(function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                inside.append(time.perf_counter() - start)

        return wrapper

    if name == "cpo":
        trainer = CPOTrainer(model=model, args=CPOConfig(**common, pair_diagnostics="no"), **data)
        margin_trainer.step_metrics = timed(diagnostics.step_metrics)

        def switch(with_diagnostics):
            diagnostics.LOGGED = diagnostics.STEP_METRICS if with_diagnostics else diagnostics.STEP_METRICS[:2]
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), **data)
        callback = DiagnosticsCallback(trainer, pairs="no")
        callback._log_step = timed(callback._log_step)
        wrapped, own = trainer.compute_loss, DPOTrainer.compute_loss.__get__(trainer)

        def switch(with_diagnostics):
            trainer.compute_loss = wrapped if with_diagnostics else own

    class Alternate(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            index = state.global_step - args.warmup
            self.kind = "with" if index < 0 or PATTERN[index % len(PATTERN)] else "without"
            switch(self.kind == "with")
            inside.clear()
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kwargs):
            wall, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
            if state.global_step > args.warmup:
                times[self.kind]["wall"].append(wall)
                times[self.kind]["cpu"].append(cpu)
                times[self.kind]["in_diagnostics"].append(sum(inside))

    trainer.add_callback(Alternate())
    logged, step_metrics = diagnostics.LOGGED, margin_trainer.step_metrics
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the reference report
            trainer.train()
    finally:
        diagnostics.LOGGED, margin_trainer.step_metrics = logged, step_metrics
    return times


def report(args, runs) -> dict[str, dict[str, float]]:
    import step_time

    print(
        f"\n{'smoke run (not a measurement): ' if args.smoke else ''}device: {step_time.device_name()}; shape "
        f"{args.shape}, batch {args.per_device_train_batch_size} pairs x {args.seq} tokens, {args.steps} timed steps "
        "of each kind per trainer, alternating"
    )
    result = {}
    for name, times in runs.items():
        median = {kind: {k: statistics.median(v) for k, v in times[kind].items()} for kind in times}
        ratios = {clock: median["with"][clock] / median["without"][clock] for clock in ("wall", "cpu")}
        # The i-th step with and the i-th without are neighbours in the pattern (A B B A: steps 0-1, 3-2, ...).
        neighbours = [a / b for a, b in zip(times["with"]["wall"], times["without"]["wall"])]
        ratios["wall_neighbours"] = statistics.median(neighbours)
        added = median["with"]["in_diagnostics"] - median["without"]["in_diagnostics"]
        share = added / median["without"]["wall"]
        result[name] = {**ratios, "diagnostics_share_of_step": share}
        print(
            f"{name}: median step {median['with']['wall']:.4f} s with, {median['without']['wall']:.4f} s without; "
            f"in the diagnostics' code {1e3 * median['with']['in_diagnostics']:.3f} ms with, "
            f"{1e3 * median['without']['in_diagnostics']:.3f} ms without"
        )
        print(
            f"{LABELS[name]} {ratios['wall']:.4f} wall, {ratios['cpu']:.4f} CPU time, {ratios['wall_neighbours']:.4f} "
            "median of neighbouring steps' wall ratios (target <= 1.01)"
        )
        print(f"{name}: added time in the diagnostics' code / step time: {share:.5f}")
    if args.json:
        with open(args.json, "w") as f:
            kind = "smoke" if args.smoke else "measurement"
            json.dump({"kind": kind, "args": vars(args), "ratios": result, "runs": runs}, f, indent=1)
    return result


def main(argv=None):
    args = _parse(argv)
    if args.smoke:
        _smoke.start(args.json)
    import step_time

    with tempfile.TemporaryDirectory() as workdir:
        step_time._build_assets(argparse.Namespace(**{**vars(args), "steps": 2 * args.steps}), workdir)  # one epoch
        runs = {name: run_trainer(name, args, workdir) for name in TRAINERS}
    report(args, runs)
    if args.smoke:
        print(_smoke.banner())


if __name__ == "__main__":
    main()
