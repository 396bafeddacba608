"""The reference precompute batches pairs longest first and returns them in dataset order.

`compute_reference_logps` sorts pair indices by padded length (`len(prompt) + max(len(chosen), len(rejected))`),
batches in that order and scatters the gathered rows back. The result must equal the dataset-order precompute up to
float round-off (different padding), in one process and under two real processes with a batch count that does not
divide evenly between the ranks.

Flakiness loop (issue 15): see tests/conftest.py.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS
from datasets import Dataset
from helpers import cpu_args, subprocess_env

from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.reference import _longest_first, compute_reference_logps

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "scripts" / "precompute_order_worker.py"
FIELDS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths")
REFERENCE_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]


def mixed_length_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs whose lengths vary by an order of magnitude, so that length-sorted batches differ from dataset order."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    return [{"prompt": text(1, 30), "chosen": " " + text(1, 40), "rejected": " " + text(1, 40)} for _ in range(n)]


def assert_same(a, b):
    for name in FIELDS:
        # rtol 1e-6: summed log-probs reach ~-100, and the padding changes matmul shapes (round-off ~1e-7 relative).
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6, msg=name)


class WidthRecorder:
    """Wrap a collator and record the padded width of every batch it builds."""

    def __init__(self, inner):
        self.inner, self.widths, self.padded = inner, [], 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.widths.append(batch["input_ids"].shape[1])
        self.padded += batch["input_ids"].numel()
        return batch


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tokenizer):
    from trl_cpo.tiny import build_tiny_llama

    args = CPOConfig(**cpu_args(tmp_path_factory.mktemp("order"), precompute_ref_batch_size=6, disable_tqdm=True))
    trainer = CPOTrainer(
        build_tiny_llama(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(mixed_length_pairs(40)),
        processing_class=tokenizer,
    )
    trainer.precompute_reference()  # what train() runs first
    return trainer


def test_longest_first_order(trainer):
    data = trainer.train_dataset
    lengths = [
        len(p) + max(len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    ]
    order = _longest_first(data)
    assert sorted(order) == list(range(len(data)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order != list(range(len(data)))  # the data is mixed-length: the order really changes
    assert _longest_first(Dataset.from_list(mixed_length_pairs(3))) is None  # not tokenized: dataset order


def test_sorted_precompute_matches_dataset_order(trainer):
    dataset = trainer.train_dataset.remove_columns(REFERENCE_COLUMNS)
    inner = trainer.data_collator
    recorders = {}
    try:
        for sort in (True, False):
            trainer.data_collator = recorders[sort] = WidthRecorder(inner)
            result = compute_reference_logps(trainer, dataset, batch_size=6, sort_by_length=sort)
            recorders[sort].result = result
    finally:
        trainer.data_collator = inner
    sorted_run, plain_run = recorders[True], recorders[False]
    assert_same(sorted_run.result, plain_run.result)
    # The trainer's own precompute (sorted, through CPOTrainer's __init__) gave the same numbers.
    assert_same(trainer.train_reference_logps, plain_run.result)
    # Batches went longest first, and the sort saved padding on this data.
    assert sorted_run.widths == sorted(sorted_run.widths, reverse=True)
    assert sorted_run.padded < 0.8 * plain_run.padded, (sorted_run.padded, plain_run.padded)
    # Dataset order: permuting the dataset permutes the result the same way.
    perm = list(range(len(dataset)))
    random.Random(1).shuffle(perm)
    permuted = compute_reference_logps(trainer, dataset.select(perm), batch_size=6)
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(permuted, name), getattr(plain_run.result, name)[perm], rtol=1e-6, atol=1e-6
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_uneven_batches(trainer, tmp_path, tokenizer):
    # 13 pairs, 3 per rank per step: 3 global steps, the last one holding a single real pair (accelerate pads the
    # other slots with duplicates that gather_for_metrics must drop before the rows are put back in dataset order).
    rows = mixed_length_pairs(13, seed=2)
    model_dir = tmp_path / "model"
    trainer.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"model_dir": str(model_dir), "data_jsonl": str(data), "out_dir": str(tmp_path), "batch_size": 3})
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(spec)], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    # One process, dataset order, same model and tokenization (a trainer built here on the same rows).
    local = CPOTrainer(str(model_dir), args=trainer.args, train_dataset=Dataset.from_list(rows))
    local.precompute_reference()  # what train() runs first
    dataset = local.train_dataset.remove_columns(REFERENCE_COLUMNS)
    single = compute_reference_logps(local, dataset, batch_size=3, sort_by_length=False)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["num_processes"] == 2
        for name, values in result["reference"].items():
            torch.testing.assert_close(torch.tensor(values), getattr(single, name), rtol=1e-6, atol=1e-6, msg=name)
