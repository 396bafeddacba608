"""The training diagnostics (`trl_cpo.metrics`, `trl_cpo.diagnostics`, `DiagnosticsCallback`): every metric the
trainers and the callback log, checked against log-probs computed by hand from the models' logits (no TRL), in one
process and in two (DDP).

By-hand values use the definitions written out here (not the package's functions): with ``d = logp(y_w) - logp(y_l)``
in the loss's space, ``ranking_accuracy = mean(pi_w > pi_l)``, ``likelihood_displacement = mean(pi_w < ref_w - atol)``,
``both_fell`` the same for both responses, ``saturated_fraction = mean(sigmoid(-beta * (d_pi - target)) < 0.01)``.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from helpers import REPO, WORDS, cpu_args, free_port, make_pairs, sequence_logps, spaced_pairs, subprocess_env
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, CPOTrainer, DiagnosticsCallback, HyPOConfig, HyPOTrainer
from trl_cpo import metrics as m
from trl_cpo.diagnostics import STEP_METRICS, step_metrics
from trl_cpo.losses import cpo_margin
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

ATOL = 1e-4  # the trainers' round-off tolerance (metrics.U_FRACTION_ATOL), written out
NEW = ("ranking_accuracy", "ref_ranking_accuracy", "likelihood_displacement", "both_fell", "saturated_fraction")


def share(mask) -> float:
    mask = list(mask)
    return sum(bool(x) for x in mask) / len(mask)


def by_hand(policy, reference, tokenizer, rows, **kwargs) -> dict[str, float]:
    """Every logged diagnostic over `rows`, from the two models' plain logits (`expected`)."""
    return expected(sequence_logps(policy, tokenizer, rows), sequence_logps(reference, tokenizer, rows), **kwargs)


def expected(policy, reference, *, per_token: bool, beta: float, target: str) -> dict[str, float]:
    """Every logged diagnostic from `helpers.sequence_logps` outputs, by the definitions in the module docstring."""
    (pc, pr), (lc, lr) = policy
    (rc, rr), _ = reference
    margin = cpo_margin(rc / lc, rr / lr, gamma=0.05).tolist()  # CPO's default; per-token (trl_cpo.losses, tested)
    if per_token:
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    d_pi, d_ref = (pc - pr).tolist(), (rc - rr).tolist()
    targets = {
        "dpo": d_ref,
        "hypo": [max(d, 0.0) for d in d_ref],
        "cpo": [d + mg / beta for d, mg in zip(d_ref, margin)],
    }[target]
    pc, pr, rc, rr = pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()
    weights = [1 / (1 + math.exp(beta * (d - t))) for d, t in zip(d_pi, targets)]  # sigmoid(-z)
    n = range(len(d_pi))
    return {
        "u_fraction": share(d_ref[i] + ATOL < d_pi[i] < 0 for i in n),
        "ref_misaligned_fraction": share(d < 0 for d in d_ref),
        "ranking_accuracy": share(pc[i] > pr[i] for i in n),
        "ref_ranking_accuracy": share(rc[i] > rr[i] for i in n),
        "likelihood_displacement": share(pc[i] < rc[i] - ATOL for i in n),
        "both_fell": share(pc[i] < rc[i] - ATOL and pr[i] < rr[i] - ATOL for i in n),
        "saturated_fraction": share(w < 0.01 for w in weights),
    }


def assert_logged(record: dict, expected: dict, prefix: str = "") -> None:
    for name, value in expected.items():
        assert record[f"{prefix}{name}"] == pytest.approx(value, abs=1e-6), name


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(WORDS)


# -- the pure functions -------------------------------------------------------------------------------------------------


def test_each_metric_on_a_handful_of_pairs():
    pc, pr = torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-2.0, -1.0, -3.0, -0.5])
    rc, rr = torch.tensor([-0.5, -2.5, -2.0, -1.0]), torch.tensor([-1.0, -0.5, -2.0, -0.4])
    assert m.ranking_accuracy(pc, pr).item() == 0.25  # only pair 0; the tie (pair 2) counts as wrong
    assert m.ranking_accuracy(rc, rr).item() == 0.25
    assert m.likelihood_displacement(pc, rc).item() == 0.5  # pairs 0 and 2 (pair 3: equal, not below)
    assert m.both_fell(pc, pr, rc, rr).item() == 0.5  # pair 0 (-2 < -1) and pair 2 (-3 < -2)
    assert m.likelihood_displacement(pc, rc, atol=0.6).item() == 0.25  # pair 0 fell by 0.5 only
    logits = torch.tensor([0.0, 4.5, 4.7, -10.0])  # sigmoid(-4.595) = 0.01
    assert m.saturated(logits).tolist() == [False, False, True, False]
    assert m.saturated_fraction(logits).item() == 0.25
    torch.testing.assert_close(m.dpo_weight(logits), torch.sigmoid(-logits))
    # DPO's reward accuracy counts a pair in U as right; ranking accuracy counts it as wrong.
    assert m.in_undesirable_space(pc[1:2], pr[1:2], rc[1:2], rr[1:2]).item()  # d_ref -2 < d_pi -1 < 0
    assert m.ranking_accuracy(pc[1:2], pr[1:2]).item() == 0.0


def test_step_metrics_are_the_functions_in_one_copy():
    torch.manual_seed(0)
    pc, pr, rc, rr, logits = torch.randn(5, 64) * 3
    values = step_metrics(pc, pr, rc, rr, logits)
    assert tuple(values) == STEP_METRICS
    assert values["ranking_accuracy"] == m.ranking_accuracy(pc, pr).item()
    assert values["saturated_fraction"] == m.saturated_fraction(logits).item()
    assert "saturated_fraction" not in step_metrics(pc, pr, rc, rr, None)  # a loss without a logistic logit


# -- the trainers log them ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cpo", "hypo"])
def test_trainers_log_every_diagnostic(tmp_path, tok, method):
    """One batch of every pair: the step-1 values come from the initial weights, the evaluation's from the final."""
    rows = make_pairs(12, seed=3)
    policy, reference = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    beta, per_token = (2.0, False) if method == "cpo" else (20.0, True)
    initial = by_hand(policy, reference, tok, rows, per_token=per_token, beta=beta, target=method)
    config_class, trainer_class = (CPOConfig, CPOTrainer) if method == "cpo" else (HyPOConfig, HyPOTrainer)
    args = cpu_args(tmp_path, per_device_train_batch_size=12, per_device_eval_batch_size=12, max_steps=1, beta=beta)
    args["loss_type"] = ["sigmoid_norm"] if per_token else ["sigmoid"]
    trainer = trainer_class(
        model=policy,
        ref_model=reference,
        args=config_class(**args, pair_diagnostics="no"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    assert_logged(trainer.state.log_history[0], initial)
    final = by_hand(trainer.model.eval(), reference, tok, rows, per_token=per_token, beta=beta, target=method)
    assert_logged(trainer.evaluate(Dataset.from_list(rows)), final, prefix="eval_")
    # Not 0 == 0: each metric takes more than one value over the pairs in one of the two checks.
    for name in NEW:
        assert any(0 < values[name] < 1 for values in (initial, final)), name
    assert not os.path.exists(tmp_path / "_diagnostics")  # pair_diagnostics="no"


# -- a plain DPOTrainer, through the callback ----------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["ref_model", "peft", "precomputed"])
def test_callback_on_a_plain_dpo_trainer(tmp_path, tok, setup):
    # Chosen and rejected share their words: lowering the rejected response lowers the chosen one too.
    rows, eval_rows = spaced_pairs(12, seed=3), spaced_pairs(9, seed=4)
    policy, reference = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    kwargs, config = {}, dict(loss_type="sigmoid", beta=2.0)
    if setup == "ref_model":
        kwargs["ref_model"] = reference
    elif setup == "peft":  # the reference is the base model, the adapter disabled; per-token space
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        config = dict(loss_type="sigmoid_norm", beta=20.0)
        reference = build_tiny_llama(tok, seed=1)  # what the adapter-disabled policy is before training
    else:
        config["precompute_ref_log_probs"] = True
        reference = build_tiny_llama(tok, seed=1)  # the policy before training
    args = cpu_args(tmp_path, per_device_train_batch_size=12, per_device_eval_batch_size=9, max_steps=2, **config)
    args["learning_rate"] = 3e-2
    trainer = DPOTrainer(
        model=policy,
        args=DPOConfig(**args),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tok,
        **kwargs,
    )
    callback = DiagnosticsCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    common = dict(per_token=config["loss_type"] == "sigmoid_norm", beta=config["beta"], target="dpo")
    # The first step: the policy is the seed-1 model; the reference the seed-2 one, or the seed-1 one (its PEFT base).
    start = by_hand(build_tiny_llama(tok, seed=1), reference, tok, rows, **common)
    assert_logged(trainer.state.log_history[0], start)
    model = trainer.model.eval()

    def logps(split_rows):
        policy_logps = sequence_logps(model, tok, split_rows)
        if setup != "peft":
            return policy_logps, sequence_logps(reference, tok, split_rows)
        with model.disable_adapter():
            return policy_logps, sequence_logps(model, tok, split_rows)

    final = expected(*logps(eval_rows), **common)
    assert_logged(trainer.evaluate(), final, prefix="eval_")
    # The whole train set at the end, in the per-pair file, and its summary.
    train_end = expected(*logps(rows), **common)
    for name, value in train_end.items():
        assert callback.final["train"][name] == pytest.approx(value, abs=1e-6), name
    for name in NEW:  # not 0 == 0 everywhere
        assert any(0 < values[name] < 1 for values in (start, final, train_end)), name
    assert sorted(os.listdir(tmp_path / "_diagnostics")) == ["eval.jsonl", "train.jsonl"]


def test_callback_skips_saturation_without_a_logistic_loss(tmp_path, tok):
    trainer = DPOTrainer(
        model=build_tiny_llama(tok, seed=1),
        ref_model=build_tiny_llama(tok, seed=2),
        args=DPOConfig(**cpu_args(tmp_path, per_device_train_batch_size=8, max_steps=1, loss_type="ipo")),
        train_dataset=Dataset.from_list(make_pairs(8, seed=3)),
        processing_class=tok,
    )
    trainer.add_callback(DiagnosticsCallback(trainer, pairs="no"))
    trainer.train()
    record = trainer.state.log_history[0]
    assert "ranking_accuracy" in record and "saturated_fraction" not in record
    with pytest.raises(ValueError, match="pair_diagnostics='sometimes' is invalid"):
        DiagnosticsCallback(trainer, pairs="sometimes")


# -- two processes ---------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from helpers import WORDS, cpu_args, make_pairs
    from trl_cpo import CPOConfig, CPOTrainer, DiagnosticsCallback, end_training
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer(WORDS)
    out, kind = sys.argv[1], sys.argv[2]
    args = cpu_args(out, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=1, beta=2.0)
    data = dict(train_dataset=Dataset.from_list(make_pairs(8, seed=3)), eval_dataset=Dataset.from_list(make_pairs(7, 4)))
    models = dict(model=build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2), processing_class=tok)
    if kind == "cpo":
        trainer = CPOTrainer(**models, **data, args=CPOConfig(**args, loss_type=["sigmoid"], pair_diagnostics="end"))
    else:
        trainer = DPOTrainer(**models, **data, args=DPOConfig(**args, loss_type="sigmoid"))
        trainer.add_callback(DiagnosticsCallback(trainer))
    metrics = trainer.evaluate()  # the initial weights, like the first training step
    trainer.train()
    trainer.save_model(out + "/final")
    if trainer.accelerator.is_main_process:
        with open(out + "/result.json", "w") as f:
            json.dump({"processes": trainer.accelerator.num_processes, "eval": metrics,
                       "train": next(r for r in trainer.state.log_history if "loss" in r)}, f)
    end_training(trainer)
    """
)


@pytest.mark.multiprocess
def test_diagnostics_gather_over_two_processes(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from trl_cpo.diagnostics import read_pairs

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    rows, eval_rows = make_pairs(8, seed=3), make_pairs(7, seed=4)
    initial, reference = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    for kind in ("cpo", "dpo"):
        out = tmp_path / kind
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--master_port", str(free_port()), str(script), str(out), kind]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        logged = json.loads((out / "result.json").read_text())
        assert logged["processes"] == 2  # really two processes
        target = "cpo" if kind == "cpo" else "dpo"
        common = dict(per_token=False, beta=2.0, target=target)
        # Train: the 8 pairs of the one step, gathered from both ranks; eval: 7 pairs, the padding duplicate dropped.
        assert_logged(logged["train"], by_hand(initial, reference, tok, rows, **common))
        whole = by_hand(initial, reference, tok, eval_rows, **common)
        assert_logged(logged["eval"], whole, prefix="eval_")
        rank0 = by_hand(initial, reference, tok, eval_rows[:4], **common)  # what rank 0 alone would have logged
        assert any(abs(rank0[name] - whole[name]) > 0.1 for name in NEW)
        # The per-pair files hold every row once, in order, at the final weights.
        final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
        for split, split_rows in (("train", rows), ("eval", eval_rows)):
            pairs = read_pairs(str(out / "_diagnostics" / f"{split}.jsonl"))
            assert [p["row"] for p in pairs] == list(range(len(split_rows)))
            (pc, pr), _ = sequence_logps(final, tok, split_rows)
            (rc, _), _ = sequence_logps(reference, tok, split_rows)
            assert [p["policy_chosen_logp"] for p in pairs] == pytest.approx(pc.tolist(), abs=1e-4)
            assert [p["policy_rejected_logp"] for p in pairs] == pytest.approx(pr.tolist(), abs=1e-4)
            assert [p["chosen_logp"] for p in pairs] == pytest.approx(rc.tolist(), abs=1e-4)
