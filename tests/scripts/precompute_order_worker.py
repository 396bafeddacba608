"""Worker for tests/test_precompute_order.py: the reference precompute under `torchrun --nproc_per_node 2`.

`python -m torch.distributed.run --nproc_per_node 2 precompute_order_worker.py SPEC.json` builds a CPOTrainer (whose
`precompute_reference()` runs the length-sorted precompute) on the pairs of SPEC's `data_jsonl` and writes every rank's gathered
reference log-probs to `<out_dir>/rank<k>.json`.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str) -> None:
    from datasets import Dataset

    from trl_cpo import CPOConfig, CPOTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["data_jsonl"], encoding="utf-8") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f if line.strip()])
    args = CPOConfig(
        output_dir=os.path.join(spec["out_dir"], "trainer"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        precompute_ref_batch_size=spec["batch_size"],
        disable_tqdm=True,
    )
    trainer = CPOTrainer(model=spec["model_dir"], args=args, train_dataset=dataset)
    reference = trainer.train_reference_logps
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "reference": {k: getattr(reference, k).tolist() for k in ("chosen", "rejected", "chosen_lengths")},
    }
    with open(os.path.join(spec["out_dir"], f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
