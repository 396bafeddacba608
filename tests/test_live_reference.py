"""The margin from the reference log-probs wherever they come from: precomputed columns, or DPOTrainer's live forward.

Live mode (`precompute_ref_log_probs=False`, or None on data that cannot be precomputed) runs the same loss as the
precompute: CPO at `cpo_gamma=0` trains like DPOTrainer with a live reference, the loss equals CPO's by hand, streamed
data and `sync_ref_model` train, the reference report accumulates, and the log history keeps DPOTrainer's layout.
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset, IterableDataset
from helpers import cpu_args, make_pairs, sequence_logps, train_logs
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.losses import cpo_margin
from trl_cpo.reference_source import precompute_blocker
from trl_cpo.tiny import build_tiny_llama

STEP_KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"]


def iterable(rows):
    def generate():
        yield from rows

    return IterableDataset.from_generator(generate)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_gamma_zero_live_reference_trains_like_dpo_with_a_live_reference(tokenizer, tmp_path, loss_type):
    rows = make_pairs(12, seed=0)
    common = cpu_args(tmp_path, max_steps=3, beta=0.5, loss_type=loss_type)
    runs = {}
    for name in ("dpo", "cpo"):
        model, ref = build_tiny_llama(tokenizer, seed=0), build_tiny_llama(tokenizer, seed=3)
        if name == "dpo":
            args = DPOConfig(**common)  # DPO's default: the live reference
            trainer = DPOTrainer(
                model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
            )
        else:
            args = CPOConfig(**common, cpo_gamma=0.0, precompute_ref_log_probs=False)
            trainer = CPOTrainer(
                model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
            )
        runs[name] = (train_logs(trainer), trainer)
    (dpo_logs, _), (cpo_logs, cpo) = runs["dpo"], runs["cpo"]
    assert cpo.args.precompute_ref_log_probs is False and cpo.train_reference_logps is None
    assert len(dpo_logs) == len(cpo_logs) == 3
    for dpo_log, cpo_log in zip(dpo_logs, cpo_logs):
        for key in STEP_KEYS:
            assert cpo_log[key] == pytest.approx(dpo_log[key], rel=1e-5, abs=1e-6), key
    assert cpo_logs[0]["loss"] != pytest.approx(cpo_logs[-1]["loss"], rel=1e-3)  # it trained


def test_live_loss_is_the_cpo_loss_by_hand_with_one_reference_forward_per_step(tokenizer, tmp_path):
    rows = make_pairs(12, seed=4)
    policy, reference = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    (pc, pr), (lc, lr) = sequence_logps(policy, tokenizer, rows)
    (rc, rr), _ = sequence_logps(reference, tokenizer, rows)
    m = cpo_margin(rc / lc, rr / lr, gamma=0.3, margin_type="inverse_prob", max_margin=50.0)
    expected = -torch.nn.functional.logsigmoid(0.5 * ((pc - pr) - (rc - rr)) - m).mean()
    args = CPOConfig(
        **cpu_args(tmp_path, per_device_train_batch_size=12, max_steps=1, beta=0.5),
        loss_type="sigmoid",
        cpo_gamma=0.3,
        cpo_max_margin=50.0,
        precompute_ref_log_probs=False,
        pair_diagnostics="no",  # the per-pair file's pass at the end runs the live reference once more
    )
    trainer = CPOTrainer(
        policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    forwards = []
    reference.register_forward_hook(lambda *_: forwards.append(1))
    log = train_logs(trainer)[0]
    assert log["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert log["cpo_margin"] == pytest.approx(m.mean().item(), rel=1e-4)
    assert len(forwards) == 1  # one reference forward for the step: DPOTrainer's own one is not run on top
    # the running reference report covers the pairs seen, on the first log entry (no entry of its own)
    assert log["reference/misaligned_fraction"] == pytest.approx(((rc - rr) < 0).float().mean().item())
    assert trainer.reference_report.num_pairs == 12


@pytest.mark.parametrize("trainer_cls, config_cls", [(CPOTrainer, CPOConfig), (ECPOCTrainer, ECPOCConfig)])
def test_streamed_train_and_eval_sets_train_live(tokenizer, tmp_path, trainer_cls, config_cls, caplog):
    args = config_cls(**cpu_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, loss_type="sigmoid"))
    assert args.precompute_ref_log_probs is None  # the default: decided from the data
    with caplog.at_level(logging.INFO, logger="trl_cpo"):
        trainer = trainer_cls(
            build_tiny_llama(tokenizer),
            ref_model=build_tiny_llama(tokenizer, seed=5),
            args=args,
            train_dataset=iterable(make_pairs(8, seed=0)),
            eval_dataset=iterable(make_pairs(6, seed=1)),
            processing_class=tokenizer,
        )
    lines = [r.getMessage() for r in caplog.records if "precompute_ref_log_probs resolved" in r.getMessage()]
    assert len(lines) == 1 and "live reference" in lines[0] and "IterableDataset" in lines[0]
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and 0 <= evals[0]["eval_u_fraction"] <= 1
    assert trainer.reference_report.num_pairs == 8  # 2 steps x 4 pairs


def test_plain_dpo_config_precomputes_map_style_text_data_with_one_line(tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trl_cpo"):
        trainer = CPOTrainer(
            build_tiny_llama(tokenizer),
            args=DPOConfig(**cpu_args(tmp_path)),
            train_dataset=Dataset.from_list(make_pairs(8, seed=0)),
            processing_class=tokenizer,
        )
    lines = [r for r in caplog.records if "precompute_ref_log_probs resolved" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "precomputed" in lines[0].getMessage()
    assert trainer.args.precompute_ref_log_probs is True and len(trainer.train_reference_logps) == 8


def test_explicit_precompute_on_streamed_data_fails_in_trls_words(tokenizer, tmp_path):
    args = CPOConfig(**cpu_args(tmp_path), precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="`precompute_ref_log_probs=True` is not supported with IterableDataset"):
        CPOTrainer(
            build_tiny_llama(tokenizer),
            args=args,
            train_dataset=iterable(make_pairs(8, seed=0)),
            processing_class=tokenizer,
        )


def test_sync_ref_model_trains_and_the_margins_follow_the_synced_reference(tokenizer, tmp_path):
    rows = make_pairs(8, seed=0)
    args = CPOConfig(
        **cpu_args(tmp_path, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2),
        sync_ref_model=True,
        ref_model_sync_steps=2,
        ref_model_mixup_alpha=1.0,
    )
    reference = build_tiny_llama(tokenizer, seed=5)
    trainer = CPOTrainer(
        build_tiny_llama(tokenizer),
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert trainer.args.precompute_ref_log_probs is False  # resolved to live: the reference changes
    logs = train_logs(trainer)
    # with alpha=1 the reference becomes the policy at step 2: the reference log-odds the margin reads move with it
    assert logs[1]["ref_misaligned_fraction"] == logs[0]["ref_misaligned_fraction"]
    assert logs[2]["cpo_margin"] != pytest.approx(logs[1]["cpo_margin"], rel=1e-4)


def test_cpo_auto_gamma_is_refused_without_a_precompute(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="cpo_auto_gamma.*precompute_ref_log_probs=False"):
        CPOConfig(**cpu_args(tmp_path), cpo_auto_gamma=0.9, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="cpo_auto_gamma=0.9 needs the whole train set"):
        CPOTrainer(
            build_tiny_llama(tokenizer),
            args=CPOConfig(**cpu_args(tmp_path), cpo_auto_gamma=0.9),
            train_dataset=iterable(make_pairs(8, seed=0)),
            processing_class=tokenizer,
        )


def test_precompute_blocker_names_each_reason():
    args = DPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False)
    rows = make_pairs(2, seed=0)
    assert precompute_blocker(args, Dataset.from_list(rows), None) is None
    assert "IterableDataset" in precompute_blocker(args, Dataset.from_list(rows), {"b": iterable(rows)})
    assert "images" in precompute_blocker(args, Dataset.from_list([{**rows[0], "images": []}]), None)
    args.sync_ref_model = True
    assert "sync_ref_model" in precompute_blocker(args, Dataset.from_list(rows), None)


def test_log_history_keeps_dpo_layout_with_the_report_on_the_first_training_entry(tokenizer, tmp_path):
    trainer = CPOTrainer(
        build_tiny_llama(tokenizer),
        args=CPOConfig(**cpu_args(tmp_path, max_steps=2)),
        train_dataset=Dataset.from_list(make_pairs(8, seed=0)),
        processing_class=tokenizer,
    )
    trainer.train()
    history = trainer.state.log_history
    assert "loss" in history[0] and "reference/misaligned_fraction" in history[0]
    assert [("reference/misaligned_fraction" in entry) for entry in history] == [True, False, False]
    assert history[0]["reference/misaligned_fraction"] == trainer.reference_report.misaligned_fraction


DDP_ITERABLE_SCRIPT = """
import json, sys
from datasets import IterableDataset
from helpers import WORDS, make_pairs
from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

tok = build_tiny_tokenizer(WORDS)
rows = make_pairs(16, seed=0)
def generate():
    yield from rows
args = CPOConfig(sys.argv[1], use_cpu=True, bf16=False, report_to="none", max_steps=2, logging_steps=1,
                 per_device_train_batch_size=2, save_strategy="no", loss_type="sigmoid")
trainer = CPOTrainer(build_tiny_llama(tok, seed=0), ref_model=build_tiny_llama(tok, seed=1), args=args,
                     train_dataset=IterableDataset.from_generator(generate), processing_class=tok)
trainer.train()
if trainer.accelerator.is_main_process:
    with open(sys.argv[1] + "/result.json", "w") as f:
        json.dump({"num_processes": trainer.accelerator.num_processes, "live": not trainer.args.precompute_ref_log_probs,
                   "log_history": trainer.state.log_history, "report_pairs": trainer.reference_report.num_pairs}, f)
trainer.end()
"""


@pytest.mark.multiprocess
def test_two_process_ddp_trains_a_streamed_dataset_live(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import REPO, free_port, subprocess_env

    script = tmp_path / "ddp_iterable.py"
    script.write_text(DDP_ITERABLE_SCRIPT)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{REPO / 'tests'}:{env['PYTHONPATH']}"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    proc = subprocess.run(
        [*launcher, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2 and result["live"]
    steps = [entry for entry in result["log_history"] if "loss" in entry]
    assert len(steps) == 2 and all(0 <= entry["u_fraction"] <= 1 for entry in steps)
    # the running report gathers both ranks' pairs: 2 steps x 2 pairs x 2 processes
    assert result["report_pairs"] == 8 and "reference/misaligned_fraction" in steps[0]
