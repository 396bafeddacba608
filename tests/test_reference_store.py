"""The reference store (`trl_cpo.reference_store`): one file format for checkpoints, the audit's file and a cache.

A sweep over what does not change the reference (beta, cpo_gamma, the method) reads one stored entry; what changes it
(the weights, the token ids, the truncation) misses; a damaged entry is not trained on; two processes can share an
entry; int64 pair digests survive a round trip.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from helpers import REPO, cpu_args, make_pairs, subprocess_env

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer, precompute
from trl_cpo.fingerprint import WEIGHT_SAMPLE, ReferenceFingerprint, model_digests, sample_positions
from trl_cpo.reference import ReferenceLogps
from trl_cpo.reference_store import (
    ReferenceFileError,
    load_reference_file,
    read_reference_logps,
    save_reference_file,
    save_reference_logps,
)
from trl_cpo.tiny import build_tiny_llama


@pytest.fixture
def passes(monkeypatch):
    """Counts reference passes (`compute_reference_logps` calls made by the trainers)."""
    calls = []
    original = precompute.compute_reference_logps

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(precompute, "compute_reference_logps", counting)
    return calls


def entries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


def build(tokenizer, tmp_path, rows, *, seed=0, trainer_cls=CPOTrainer, config_cls=CPOConfig, **config):
    trainer = trainer_cls(
        build_tiny_llama(tokenizer, seed=seed),
        args=config_cls(**cpu_args(tmp_path, **config)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.precompute_reference()  # what train() runs first
    return trainer


def test_a_sweep_pays_the_reference_pass_once(tokenizer, tmp_path, passes, reference_store_dir, capsys):
    rows = make_pairs(8, seed=0)
    first = build(tokenizer, tmp_path, rows, cpo_gamma=0.05, beta=2.5)
    assert len(passes) == 1 and len(entries(reference_store_dir)) == 1
    stored = os.path.join(reference_store_dir, entries(reference_store_dir)[0])
    assert f"Reference log-probs of train (8 pairs): computed, stored in {stored}." in capsys.readouterr().out
    # another cpo_gamma, beta, loss space and even method: the same reference, read from the store
    second = build(tokenizer, tmp_path, rows, cpo_gamma=0.2, beta=0.5, loss_type="sigmoid")
    third = build(tokenizer, tmp_path, rows, trainer_cls=ECPOCTrainer, config_cls=ECPOCConfig)
    assert len(passes) == 1
    said = f"Reference log-probs of train (8 pairs): read from the reference store ({stored}), no forward."
    assert capsys.readouterr().out.count(said) == 2  # printed at the default log level, one line each
    for other in (second, third):
        torch.testing.assert_close(other.train_reference_logps.chosen, first.train_reference_logps.chosen)
        torch.testing.assert_close(other.train_reference_logps.rejected, first.train_reference_logps.rejected)
    # what changes: the margins, computed from the same reference
    margins = [t.reference_margin(t.train_reference_logps) for t in (first, second)]
    assert not torch.allclose(*margins)
    second.train()  # and it trains on them


@pytest.mark.parametrize(
    "change",
    ["weights", "tokens", "max_length", "truncation_mode"],
)
def test_what_changes_the_reference_misses(tokenizer, tmp_path, passes, reference_store_dir, change):
    rows = make_pairs(8, seed=0)
    base = dict(max_length=9, truncation_mode="keep_start")  # prompts of 4-6 tokens: completions are cut
    first = build(tokenizer, tmp_path, rows, **base)
    other_rows, seed, settings = rows, 0, dict(base)
    if change == "weights":
        seed = 1
    elif change == "tokens":
        other_rows = [rows[0], dict(rows[1], chosen=rows[1]["chosen"] + " very"), *rows[2:]]  # one token more
    elif change == "max_length":
        settings["max_length"] = 10
    else:
        settings["truncation_mode"] = "keep_end"
    second = build(tokenizer, tmp_path, other_rows, seed=seed, **settings)
    assert len(passes) == 2 and len(entries(reference_store_dir)) == 2
    assert not torch.equal(first.train_reference_logps.chosen, second.train_reference_logps.chosen)


def test_a_damaged_entry_is_not_used_and_is_replaced(tokenizer, tmp_path, passes, reference_store_dir, caplog):
    rows = make_pairs(8, seed=0)
    fresh = build(tokenizer, tmp_path, rows).train_reference_logps
    (entry,) = entries(reference_store_dir)
    path = os.path.join(reference_store_dir, entry)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        again = build(tokenizer, tmp_path, rows).train_reference_logps
    assert len(passes) == 2  # recomputed, not read
    assert any("not used" in r.getMessage() and "truncated or corrupted" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again.chosen, fresh.chosen)
    read_reference_logps(path)  # replaced by a whole entry


def test_cache_off_computes_and_stores_nothing(tokenizer, tmp_path, passes, reference_store_dir):
    rows = make_pairs(8, seed=0)
    build(tokenizer, tmp_path, rows, reference_cache=False)
    build(tokenizer, tmp_path, rows, reference_cache=False)
    assert len(passes) == 2 and entries(reference_store_dir) == []


def test_a_store_that_cannot_be_written_costs_a_warning_not_the_run(tokenizer, tmp_path, passes, caplog, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TRL_CPO_REFERENCE_CACHE", str(blocker / "store"))  # its parent is a file: no folder there
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer = build(tokenizer, tmp_path, make_pairs(8, seed=0))
    assert len(passes) == 1 and trainer.train_reference_logps is not None
    (warning,) = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert "training goes on" in warning and "reference_cache_dir" in warning and "reference_cache=False" in warning
    trainer.train()


def test_reference_cache_dir_sets_the_folder(tokenizer, tmp_path, reference_store_dir):
    folder = tmp_path / "my-store"
    build(tokenizer, tmp_path, make_pairs(8, seed=0), reference_cache_dir=str(folder))
    assert len(entries(folder)) == 1 and entries(reference_store_dir) == []
    with pytest.raises(ValueError, match="reference_cache_dir"):
        CPOConfig(**cpu_args(tmp_path), reference_cache_dir=str(REPO / "README.md"))


SHARED_ENTRY = textwrap.dedent(
    """
    import sys
    from datasets import Dataset
    from helpers import WORDS, cpu_args, make_pairs
    from trl_cpo import CPOConfig, CPOTrainer
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer(WORDS)
    trainer = CPOTrainer(build_tiny_llama(tok), args=CPOConfig(**cpu_args(sys.argv[1])),
                         train_dataset=Dataset.from_list(make_pairs(64, seed=3)), processing_class=tok)
    print("CHOSEN", trainer.train_reference_logps.chosen.sum().item())
    """
)


def test_two_processes_share_one_entry(tokenizer, tmp_path, passes):
    store = tmp_path / "shared-store"
    env = subprocess_env()
    env["TRL_CPO_REFERENCE_CACHE"] = str(store)
    env["PYTHONPATH"] = f"{REPO / 'tests'}:{env['PYTHONPATH']}"
    command = [sys.executable, "-c", SHARED_ENTRY]
    # two runs at once, computing and writing the same entry
    procs = [
        subprocess.Popen(
            [*command, str(tmp_path / f"run{i}")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err.decode()[-2000:] for _, err in outputs]
    (entry,) = entries(store)  # one whole entry, no temporary file left
    assert [name for name in os.listdir(store) if name.endswith(".tmp")] == []
    stored, _, _ = read_reference_logps(str(store / entry))
    sums = {out.decode().split("CHOSEN")[1].strip() for out, _ in outputs}
    assert len(sums) == 1
    # a third run reads it
    os.environ["TRL_CPO_REFERENCE_CACHE"] = str(store)
    from helpers import make_pairs as pairs

    trainer = build(tokenizer, tmp_path, pairs(64, seed=3))
    assert passes == []
    torch.testing.assert_close(trainer.train_reference_logps.chosen, stored.chosen)


def test_int64_digests_and_missing_digests_round_trip(tmp_path):
    n = 3
    digests = torch.tensor([1234567890123456789, -5, 7], dtype=torch.int64)
    reference = ReferenceLogps(-torch.rand(n), -torch.rand(n), torch.ones(n), torch.full((n,), 2.0), digests)
    fingerprint = ReferenceFingerprint("m", "w", "t", "d", n, 64, "keep_start")
    save_reference_logps(str(tmp_path / "a.safetensors"), reference, fingerprint)
    back, back_fingerprint, _ = read_reference_logps(str(tmp_path / "a.safetensors"))
    assert back.row_digests.dtype == torch.int64 and torch.equal(back.row_digests, digests)
    assert back_fingerprint == fingerprint
    without = ReferenceLogps(
        reference.chosen, reference.rejected, reference.chosen_lengths, reference.rejected_lengths
    )
    save_reference_file(str(tmp_path / "b.safetensors"), {"train": without})
    splits, _ = load_reference_file(str(tmp_path / "b.safetensors"))
    assert splits["train"].row_digests is None and torch.equal(splits["train"].chosen, reference.chosen)


def test_a_file_of_the_old_audit_layout_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"chosen": torch.zeros(2)}, path, metadata={"format": "trl_cpo.reference_logps", "version": "1"})
    with pytest.raises(ReferenceFileError, match="trl-cpo audit"):
        read_reference_logps(path)


@pytest.mark.parametrize("numel", [1025, 38_597_376, 525_336_576, 2**40 + 7])  # GPT-2 / Llama-3 embeddings, huge
def test_weight_sample_positions_stay_inside_any_tensor(numel):
    positions = sample_positions(numel)
    assert positions.dtype == torch.int64 and len(positions) == WEIGHT_SAMPLE
    assert positions[0] == 0 and positions[-1] == numel - 1
    assert bool((positions[1:] > positions[:-1]).all())  # distinct and in order


def test_weights_of_a_real_size_embedding_are_digested():
    """A 50257 x 768 embedding (GPT-2's): float positions used to round past its end (IndexError)."""
    embedding = torch.nn.Embedding(50257, 768)
    _, first = model_digests(embedding)
    with torch.no_grad():
        embedding.weight[-1, -1] += 1.0  # the last value is always sampled
    assert model_digests(embedding)[1] != first
