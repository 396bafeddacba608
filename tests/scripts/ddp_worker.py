"""Worker for tests/test_distributed.py: train CPO / E-CPOC on a tiny model and dump what the test compares.

Run as `python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py SPEC.json` (or in-process through `run` for
the 1-process baseline). Every rank writes `<out_dir>/<scenario>.rank<k>.json`; rank 0 also writes the trained
weights of phase-B scenarios to `<out_dir>/<scenario>.safetensors`.

Scenarios (see the test's docstring for why each comparison is exact):
- phase "A": learning_rate=0 and a separate, differently initialised reference model, so the policy never moves and
  every per-pair quantity is independent of the order and grouping of the pairs; global batch 8, logging once per
  epoch (the logged values are epoch means).
- phase "B": learning_rate>0, the reference is the policy's own start (precomputed), global batch = the whole
  dataset, so each optimizer step sees every pair whatever the sampler order; logging every step.
"""

from __future__ import annotations

import json
import os
import sys


def _load_dataset(spec, source):
    from datasets import Dataset, load_from_disk

    if source == "disk":
        return load_from_disk(spec["disk_dir"])
    with open(spec["data_jsonl"], encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f if line.strip()])


class RecordingCollator:
    """Record, per rank, which pairs (identified by their precomputed reference log-probs) reached this process."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[list[float]] = []

    def __call__(self, examples):
        if "ref_chosen_logps" in examples[0]:  # training batches (the precompute's batches carry no reference yet)
            self.seen.extend([float(ex["ref_chosen_logps"]), float(ex["ref_rejected_logps"])] for ex in examples)
        return self.inner(examples)


#: Method fields of each scenario's config: the released defaults, spelled out so the test's by-hand numbers match.
METHOD_FIELDS = {
    "cpo": {"cpo_gamma": 0.05},
    "ecpoc": {"ecpoc_gamma": 0.5, "ecpoc_tau": 2.0, "ecpoc_alpha": 1.0},
}


def _config(spec, method, phase, world_size, out_dir):
    from trl_cpo.methods import METHODS

    n = spec["num_pairs"]
    global_batch = spec["phase_a_global_batch"] if phase == "A" else n
    assert global_batch % world_size == 0 and n % global_batch == 0
    common = dict(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=global_batch // world_size,
        gradient_accumulation_steps=1,
        save_strategy="no",
        seed=0,
        max_length=64,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # The recording collator counts training batches: no end-of-training pass for the per-pair files.
        pair_diagnostics="no",
    )
    if phase == "A":
        steps = n // global_batch
        common.update(learning_rate=0.0, max_steps=steps, logging_steps=steps, lr_scheduler_type="constant")
    else:
        common.update(
            learning_rate=spec["phase_b_lr"],
            num_train_epochs=spec["phase_b_epochs"],
            logging_steps=1,
            lr_scheduler_type="constant",
        )
    return METHODS[method].config_class(**METHOD_FIELDS[method], **common)


def run_scenario(spec, name, method, source, phase):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from trl_cpo.trainers import TRAINERS

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    out_dir = os.path.join(spec["out_dir"], name)
    args = _config(spec, method, phase, world_size, out_dir)
    trainer_cls = TRAINERS[method]
    ref_model = None
    if phase == "A":
        ref_model = AutoModelForCausalLM.from_pretrained(spec["ref_model_dir"], dtype=torch.float32)
    trainer = trainer_cls(
        model=spec["model_dir"], ref_model=ref_model, args=args, train_dataset=_load_dataset(spec, source)
    )
    recorder = RecordingCollator(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.train()

    reference = trainer.train_reference_logps
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "process_index": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "model_class": type(trainer.model_wrapped).__name__,
        "train_rows": len(trainer.train_dataset),
        "log_history": trainer.state.log_history,
        "seen": recorder.seen,
        "reference": {
            k: getattr(reference, k).tolist() for k in ("chosen", "rejected", "chosen_lengths", "rejected_lengths")
        },
    }
    with open(os.path.join(spec["out_dir"], f"{name}.rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    if phase == "B" and trainer.accelerator.is_main_process:
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        save_file(
            {k: v.detach().contiguous() for k, v in state.items()},
            os.path.join(spec["out_dir"], f"{name}.safetensors"),
        )
    trainer.accelerator.wait_for_everyone()
    return result


def policy_table(spec):
    """Per-pair log-probs of the untrained policy: the reference log-probs of a trainer whose reference is the policy."""
    from trl_cpo import CPOConfig, CPOTrainer

    args = CPOConfig(
        output_dir=os.path.join(spec["out_dir"], "policy-table"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        max_length=64,
        disable_tqdm=True,
    )
    trainer = CPOTrainer(model=spec["model_dir"], args=args, train_dataset=_load_dataset(spec, "memory"))
    table = trainer.train_reference_logps
    return {k: getattr(table, k).tolist() for k in ("chosen", "rejected", "chosen_lengths", "rejected_lengths")}


def run(spec):
    results = {}
    for scenario in spec["scenarios"]:
        results[scenario["name"]] = run_scenario(spec, **scenario)
    if spec.get("policy_table"):
        with open(os.path.join(spec["out_dir"], "policy_table.json"), "w") as f:
            json.dump(policy_table(spec), f)
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
