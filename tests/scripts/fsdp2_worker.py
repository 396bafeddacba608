"""Worker for tests/test_fsdp2.py: CPO, E-CPOC and the recipe's DPO baseline under FSDP2 on CPU, plus the recipe itself.

Run as `python -m torch.distributed.run --nproc_per_node 2 fsdp2_worker.py SPEC.json` (FSDP2 through the harness in
`fsdp2_harness.py`), or in-process through `run` for the 1-process baseline (no FSDP: plain single-process training,
the numbers FSDP2 must reproduce). Every rank writes `<out_dir>/<run>.rank<k>.json`; rank 0 also writes the trained
weights (gathered from the shards) to `<out_dir>/<run>.safetensors`.

Runs (the spec lists them, in order):
- `{"name", "method", "state_dict_type"}`: `method` is cpo | ecpoc | dpo; fp32, SGD with momentum, a linear schedule,
  `global_batch` pairs per optimizer step on any world size, `steps` steps; under FSDP2 a checkpoint is saved after
  step `save_step` with the given `fsdp_config["state_dict_type"]`. Per-pair files (`pair_diagnostics="eval"`) are
  written after each evaluation (`<out_dir>/<run>/_diagnostics/step-<N>/eval.jsonl`) and at the end of training
  (`_diagnostics/{train,eval}.jsonl`), before the facts are recorded.
- `{"name", "method", "state_dict_type", "resume": "<run>"}`: the same run, resumed from that run's checkpoint.
- `{"name", "recipe": [argv...], "env": {...}}`: `recipes/cpo_llama3.py` executed as `__main__` with that command line,
  after setting `env` (e.g. the variables `accelerate launch` would set).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsdp2_harness import clear_fsdp_env, enable_cpu_fsdp2, fsdp2_facts  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
#: The recipe script.
RECIPE = REPO / "recipes" / "cpo_llama3.py"


def dpo_baseline_classes():
    """(trainer class, config class) of the recipe's DPO baseline (in the package's train script)."""
    from trl_cpo.scripts.train import DPOBaselineConfig, DPOBaselineTrainer

    return DPOBaselineTrainer, DPOBaselineConfig


def trainer_classes(method):
    from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer

    if method == "dpo":
        return dpo_baseline_classes()
    return {"cpo": (CPOTrainer, CPOConfig), "ecpoc": (ECPOCTrainer, ECPOCConfig)}[method]


def _dataset(path):
    from datasets import Dataset

    with open(path, encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f if line.strip()])


def _args(spec, run, world_size, fsdp):
    global_batch = spec["global_batch"]
    assert global_batch % world_size == 0
    kwargs = dict(
        output_dir=os.path.join(spec["out_dir"], run["name"]),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=global_batch // world_size,
        per_device_eval_batch_size=global_batch // world_size,
        eval_strategy="steps",
        eval_steps=1,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="linear",
        optim="sgd",
        optim_args="momentum=0.9",
        max_grad_norm=1e9,  # grad_norm is still computed and logged, but never clips
        logging_steps=1,
        seed=0,
        data_seed=0,
        max_length=64,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        # Per-pair passes (no-grad forwards) after each evaluation, between training steps, and at the end of training:
        # their files are compared with the 1-process run's, and the checks of the model below run after the last.
        pair_diagnostics="eval",
    )
    if fsdp:
        kwargs.update(
            fsdp=True,
            fsdp_config={**spec["fsdp_config"], "state_dict_type": run["state_dict_type"]},
            save_strategy="steps",
            save_steps=10**6,  # SaveAt saves the one checkpoint the resume runs start from
            save_only_model=False,
        )
    return kwargs


class StepCounter(TrainerCallback):
    """Count the optimizer steps this `train()` call ran (a resumed run only runs the steps after its checkpoint)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class SaveAt(TrainerCallback):
    """Save one checkpoint, after optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True


def _optimizer_state_names(trainer):
    """The parameter names of the optimizer state that torch.distributed.checkpoint builds for a checkpoint, or the
    error it raised. Called before anything takes the model's state dict: FSDP2's model state-dict hooks reshard,
    which would hide parameters a no-grad pass left unsharded (issue 19)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    try:
        state = get_optimizer_state_dict(trainer.model_wrapped, trainer.optimizer)
    except Exception as error:  # recorded, so that the test names it
        return repr(error)
    return sorted(state["state"])


def _state_dict(trainer):
    """Full (unsharded) weights, on rank 0 only under FSDP (every rank takes part in the gather)."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.accelerator.is_main_process:
        return None
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def run_training(spec, run):
    from safetensors.torch import save_file

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = world_size > 1
    trainer_cls, config_cls = trainer_classes(run["method"])
    args = config_cls(**_args(spec, run, world_size, fsdp))
    trainer = trainer_cls(
        model=spec["model_dir"],
        args=args,
        train_dataset=_dataset(spec["data_jsonl"]),
        eval_dataset=_dataset(spec["eval_jsonl"]),
    )
    counter = StepCounter()
    trainer.add_callback(counter)
    if fsdp and not run.get("resume"):
        trainer.add_callback(SaveAt(spec["save_step"]))
    resume = None
    if run.get("resume"):
        resume = os.path.join(spec["out_dir"], run["resume"], f"checkpoint-{spec['save_step']}")
    trainer.train(resume_from_checkpoint=resume)

    reference = trainer.train_reference_logps
    eval_reference = trainer.eval_reference_logps["eval"]
    result = {
        **(fsdp2_facts(trainer) if fsdp else {"num_processes": trainer.accelerator.num_processes}),
        "optimizer_state": _optimizer_state_names(trainer) if fsdp else None,
        # Each split's summary of the per-pair pass, on this rank (every rank gathers all pairs).
        "pair_summary": trainer.diagnostics.final,
        "trainer_class": type(trainer).__name__,
        "global_step": trainer.state.global_step,
        "steps_this_session": counter.steps,
        "log_history": trainer.state.log_history,
        "reference": {k: getattr(reference, k).tolist() for k in ("chosen", "rejected")},
        "eval_reference": {k: getattr(eval_reference, k).tolist() for k in ("chosen", "rejected")},
    }
    rank = trainer.accelerator.process_index
    with open(os.path.join(spec["out_dir"], f"{run['name']}.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    state = _state_dict(trainer)
    if state is not None:
        save_file(state, os.path.join(spec["out_dir"], f"{run['name']}.safetensors"))
    trainer.accelerator.wait_for_everyone()
    return result


def run_recipe(spec, run):
    """Execute the recipe script as `__main__` (what `torchrun recipes/cpo_llama3.py ...` runs), recording its trainer.

    The recipe ends with `trainer.end()`, which destroys the process group. A second `init_process_group` in the same
    torchrun process re-reads the first one's rendezvous keys and can pair the ranks up wrongly (seen: a deadlock in
    the next barrier), so `end` is recorded here and the group is destroyed once, when the worker is done.
    """
    from transformers import Trainer

    seen = {}
    original_train, original_end = Trainer.train, Trainer.end

    def train(self, *args, **kwargs):
        output = original_train(self, *args, **kwargs)
        seen["facts"] = fsdp2_facts(self)
        seen["trainer_class"] = type(self).__name__
        return output

    def end(self):
        seen["ended"] = True

    argv = sys.argv
    Trainer.train, Trainer.end = train, end
    sys.argv = [str(RECIPE), *run["recipe"]]
    try:
        runpy.run_path(str(RECIPE), run_name="__main__")
    finally:
        Trainer.train, Trainer.end, sys.argv = original_train, original_end, argv
    assert seen.get("ended"), "the recipe no longer calls trainer.end(); update this worker"
    rank = seen["facts"]["process_index"]
    with open(os.path.join(spec["out_dir"], f"{run['name']}.rank{rank}.json"), "w") as f:
        json.dump({**seen["facts"], "trainer_class": seen["trainer_class"]}, f)


def run(spec):
    fsdp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if fsdp:
        enable_cpu_fsdp2()
    results = {}
    for run_spec in spec["runs"]:
        if not fsdp and (run_spec.get("resume") or run_spec.get("recipe")):
            continue  # checkpoints and the recipe are FSDP-only scenarios
        environ = dict(os.environ)
        clear_fsdp_env()
        os.environ.update(run_spec.get("env", {}))
        try:
            if "recipe" in run_spec:
                run_recipe(spec, run_spec)
            else:
                results[run_spec["name"]] = run_training(spec, run_spec)
        finally:
            os.environ.clear()
            os.environ.update(environ)
    if fsdp:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
