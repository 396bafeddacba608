"""`UFractionCallback` on tiny DPO / CPO runs with evaluation, its logged values checked against logits by hand.

Flakiness loop (issue 15): see tests/conftest.py.
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from datasets import Dataset
from helpers import REPO, WORDS, pair_logps, spaced_pairs, subprocess_env
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.callbacks import UFractionCallback
from trl_cpo.metrics import U_FRACTION_ATOL, ref_misaligned_fraction, u_fraction
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

TRAIN_ARGS = dict(
    use_cpu=True,
    bf16=False,
    report_to="none",
    max_steps=2,
    eval_strategy="steps",
    eval_steps=1,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=3,  # 10 eval pairs: the last batch is partial
    learning_rate=1e-3,  # small steps: U stays non-empty, so the checks below are not 0 == 0
    save_strategy="no",
    logging_steps=1,
    disable_dropout=True,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(WORDS)


def by_hand(policy, reference, tokenizer, rows, length_normalized):
    policy_c, policy_r = pair_logps(policy, tokenizer, rows, length_normalized)
    ref_c, ref_r = pair_logps(reference, tokenizer, rows, length_normalized)
    return {
        "u_fraction": u_fraction(policy_c, policy_r, ref_c, ref_r, atol=U_FRACTION_ATOL).item(),
        "ref_misaligned_fraction": ref_misaligned_fraction(ref_c, ref_r).item(),
    }


def records(trainer, prefix="eval"):
    """The callback's records: those with its metric but not the evaluation's own record (which has the loss, and,
    from CPOTrainer, the step-mean `u_fraction` under the same prefix)."""
    return [r for r in trainer.state.log_history if f"{prefix}_u_fraction" in r and f"{prefix}_loss" not in r]


@pytest.mark.parametrize("setup", ["ref_model", "peft"])
def test_logs_u_fraction_on_a_plain_dpo_trainer(tmp_path, tok, setup):
    rows = spaced_pairs(10, seed=1)
    kwargs, loss_type = {}, "sigmoid"
    if setup == "ref_model":
        kwargs["ref_model"] = build_tiny_llama(tok, seed=1)  # a reference unlike the policy: U is not empty
    else:
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        loss_type = "sigmoid_norm"  # the callback follows it: per-token log-probs
    trainer = DPOTrainer(
        build_tiny_llama(tok, seed=0),
        args=DPOConfig(str(tmp_path), loss_type=loss_type, **TRAIN_ARGS),
        train_dataset=Dataset.from_list(spaced_pairs(8, seed=0)),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tok,
        **kwargs,
    )
    callback = UFractionCallback(trainer)
    assert callback.length_normalized is (setup == "peft")
    trainer.add_callback(callback)
    trainer.train()

    logged = records(trainer)
    assert [r["step"] for r in logged] == [1, 2]
    # The eval record of each evaluation is followed by the callback's record at the same step.
    eval_records = [r for r in trainer.state.log_history if "eval_loss" in r]
    for eval_record, record in zip(eval_records, logged):
        assert trainer.state.log_history.index(record) == trainer.state.log_history.index(eval_record) + 1

    policy = trainer.model.eval()
    if setup == "ref_model":
        expected = by_hand(policy, trainer.ref_model, tok, rows, length_normalized=False)
    else:
        policy_c, policy_r = pair_logps(policy, tok, rows, length_normalized=True)
        with policy.disable_adapter():
            ref_c, ref_r = pair_logps(policy, tok, rows, length_normalized=True)
        expected = {
            "u_fraction": u_fraction(policy_c, policy_r, ref_c, ref_r, atol=U_FRACTION_ATOL).item(),
            "ref_misaligned_fraction": ref_misaligned_fraction(ref_c, ref_r).item(),
        }
    # The last evaluation ran on the final weights.
    assert logged[-1]["eval_u_fraction"] == pytest.approx(expected["u_fraction"])
    assert logged[-1]["eval_ref_misaligned_fraction"] == pytest.approx(expected["ref_misaligned_fraction"])
    # evaluate() returns them too (metric_for_best_model can use them).
    metrics = trainer.evaluate()
    assert metrics["eval_u_fraction"] == pytest.approx(expected["u_fraction"])
    if setup == "ref_model":
        assert 0 < expected["u_fraction"] < 1 and 0 < expected["ref_misaligned_fraction"] < 1


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_works_with_cpo_trainer_and_a_dict_of_eval_sets(tmp_path, tok, loss_type):
    initial = build_tiny_llama(tok, seed=0)
    sets = {"a": spaced_pairs(7, seed=2), "b": spaced_pairs(5, seed=3)}
    trainer = CPOTrainer(
        build_tiny_llama(tok, seed=0),
        args=CPOConfig(str(tmp_path), loss_type=loss_type, **TRAIN_ARGS),
        train_dataset=Dataset.from_list(spaced_pairs(8, seed=0)),
        eval_dataset={name: Dataset.from_list(rows) for name, rows in sets.items()},
        processing_class=tok,
    )
    callback = UFractionCallback(trainer)
    # the callback measures U in the space of the trainer's loss, as the trainer's own u_fraction does
    assert callback.length_normalized is trainer.length_normalized is (loss_type == "sigmoid_norm")
    trainer.add_callback(callback)
    trainer.train()
    for name, rows in sets.items():
        logged = records(trainer, f"eval_{name}")
        assert [r["step"] for r in logged] == [1, 2]
        # CPO precomputes the reference (the initial policy) into the batches; the callback reads it from there.
        expected = by_hand(trainer.model.eval(), initial, tok, rows, length_normalized=(loss_type == "sigmoid_norm"))
        assert logged[-1][f"eval_{name}_u_fraction"] == pytest.approx(expected["u_fraction"])
        assert logged[-1][f"eval_{name}_ref_misaligned_fraction"] == pytest.approx(expected["ref_misaligned_fraction"])


def test_rejects_ld_alpha():
    trainer = SimpleNamespace(args=SimpleNamespace(loss_type=["sigmoid"], ld_alpha=0.5))
    with pytest.raises(ValueError, match="ld_alpha"):
        UFractionCallback(trainer)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from helpers import WORDS, spaced_pairs
    from trl_cpo import end_training
    from trl_cpo.callbacks import UFractionCallback
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer(WORDS)
    args = DPOConfig(sys.argv[1], use_cpu=True, bf16=False, report_to="none", per_device_eval_batch_size=2)
    trainer = DPOTrainer(
        build_tiny_llama(tok, seed=0), ref_model=build_tiny_llama(tok, seed=1), args=args,
        train_dataset=Dataset.from_list(spaced_pairs(4, seed=0)), eval_dataset=Dataset.from_list(spaced_pairs(7, 6)),
        processing_class=tok,
    )
    callback = UFractionCallback(trainer)
    trainer.add_callback(callback)
    metrics = trainer.evaluate()
    per_pair = callback.per_pair_logps(trainer.get_eval_dataloader())
    if trainer.accelerator.is_main_process:
        with open(sys.argv[1] + "/result.json", "w") as f:
            json.dump({
                "num_processes": trainer.accelerator.num_processes,
                "rows": len(per_pair["policy_chosen"]),
                "metrics": metrics,
                "log_history": trainer.state.log_history,
            }, f)
    end_training(trainer)  # the clean end of a plain Trainer's distributed run (trl_cpo._distributed)
    """
)


@pytest.mark.multiprocess
def test_gathers_over_two_processes(tmp_path, tok):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["num_processes"] == 2  # really two processes
    assert result["rows"] == 7  # gathered over ranks, the duplicate that filled the last step dropped
    logged = [r for r in result["log_history"] if "eval_u_fraction" in r]
    assert len(logged) == 1
    # Before any training step the policy is the seed-0 model and the reference the seed-1 model.
    policy, reference = build_tiny_llama(tok, seed=0).eval(), build_tiny_llama(tok, seed=1).eval()
    expected = by_hand(policy, reference, tok, spaced_pairs(7, 6), length_normalized=False)
    assert logged[0]["eval_u_fraction"] == pytest.approx(expected["u_fraction"], abs=1e-6)
    assert logged[0]["eval_ref_misaligned_fraction"] == pytest.approx(expected["ref_misaligned_fraction"], abs=1e-6)
    assert result["metrics"]["eval_u_fraction"] == logged[0]["eval_u_fraction"]
    assert 0 < expected["u_fraction"] < 1 and 0 < expected["ref_misaligned_fraction"] < 1
