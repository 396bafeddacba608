"""HyPO (Yuan et al., ICLR 2026, arXiv:2602.11902), the released CPO code's default variant: a named method equal to the
released `clip` formula, E-CPOC's limit as tau grows, in the demo with its predicted optimum, and in the audit's verdict
(with the verdict on data that carries no preference signal)."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import CPU, WORDS, cpu_args, make_pairs, sequence_logps

from trl_cpo import ECPOCTrainer, HyPOConfig, HyPOTrainer
from trl_cpo.losses import ecpoc_loss, ecpoc_target
from trl_cpo.methods import METHODS
from trl_cpo.reference import ReferenceLogps
from trl_cpo.report import reference_report
from trl_cpo.scripts import train as train_script
from trl_cpo.scripts.audit import analysis
from trl_cpo.scripts.demo import args as demo_args
from trl_cpo.scripts.demo import optimum, rows
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer
from trl_cpo.trainers import trainer_class


def released_clip_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """The released code's default (`easy_version='clip'`), as the issue states it:
    ``-logsigmoid(beta * (delta_pi - clamp(delta_ref, min=0)))``, per pair, on length-normalized log-probs."""
    delta_pi = policy_chosen - policy_rejected
    delta_ref = ref_chosen - ref_rejected
    return -F.logsigmoid(beta * (delta_pi - torch.clamp(delta_ref, min=0)))


def test_hypo_is_a_named_method():
    method = METHODS["hypo"]
    assert method.base is METHODS["ecpoc"] and method.title == "HyPO"
    assert method.pinned == {"ecpoc_gamma": 0.0, "ecpoc_tau": math.inf, "ecpoc_alpha": 1.0}
    assert trainer_class(method) is HyPOTrainer and issubclass(HyPOTrainer, ECPOCTrainer)
    assert method.config_class is HyPOConfig and HyPOTrainer._paper["id"] == "2602.11902"
    assert "hypo" in train_script.METHODS  # trl-cpo train --method hypo
    with pytest.raises(TypeError, match="ecpoc_gamma"):  # pinned: not an argument
        HyPOConfig(**CPU, ecpoc_gamma=0.5)


def test_loss_equals_the_released_clip_formula():
    torch.manual_seed(0)
    pc, pr, rc, rr = -torch.rand(4, 256) * 4  # per-token log-probs; about half the pairs misaligned
    expected = released_clip_loss(pc, pr, rc, rr, beta=2.5)
    torch.testing.assert_close(ecpoc_loss(pc, pr, rc, rr, beta=2.5, gamma=0.0, tau=math.inf, alpha=1.0), expected)
    lengths = torch.ones(256)
    target = METHODS["hypo"].target_from_config(ReferenceLogps(rc, rr, lengths, lengths), HyPOConfig(**CPU))
    torch.testing.assert_close(-F.logsigmoid(2.5 * ((pc - pr) - target)), expected)
    assert (rc < rr).float().mean() > 0.3  # the clip binds on many pairs


def test_the_trainer_minimises_the_released_formula(tmp_path):
    tokenizer = build_tiny_tokenizer(WORDS)
    data = make_pairs(10, seed=3)
    policy, reference = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    (pc, pr), (lc, lr) = sequence_logps(policy, tokenizer, data)
    (rc, rr), _ = sequence_logps(reference, tokenizer, data)
    expected = released_clip_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=2.5).mean().item()
    trainer = HyPOTrainer(
        model=policy,
        ref_model=reference,
        args=HyPOConfig(**cpu_args(tmp_path, per_device_train_batch_size=10, max_steps=1), pair_diagnostics="no"),
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert 0 < trainer.state.log_history[0]["reference/misaligned_fraction"] < 1


def test_ecpoc_converges_to_hypo_as_tau_grows():
    delta_ref = torch.linspace(-3, 3, 601)
    zeros = torch.zeros_like(delta_ref)
    hard = delta_ref.clamp(min=0)
    gaps = []
    for tau in (1.0, 10.0, 100.0, 1000.0):
        soft = ecpoc_target(delta_ref, zeros, gamma=0.0, tau=tau, alpha=1.0)
        gap = (soft - hard).abs().max().item()
        assert gap <= math.log(2) / tau + 1e-5  # softplus(x)/tau exceeds relu(x)/tau by at most log(2)/tau
        gaps.append(gap)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3
    torch.testing.assert_close(ecpoc_target(delta_ref, zeros, gamma=0.0, tau=math.inf, alpha=1.0), hard)


def test_the_demo_has_a_hypo_row_with_its_predicted_optimum():
    assert rows.ROWS["HyPO"].method == "hypo" and "HyPO" in demo_args.DemoArguments().methods
    config = rows.build_config("HyPO", demo_args.DemoArguments(), seed=0, output_dir="unused")
    assert isinstance(config, HyPOConfig)
    lengths = torch.tensor([2.0, 3.0, 1.0, 4.0])
    reference = ReferenceLogps(
        torch.tensor([-6.0, -3.0, -1.0, -4.0]), torch.tensor([-2.0, -9.0, -1.5, -4.0]), lengths, lengths
    )
    delta_ref = reference.delta_ref(True)
    t1, t2 = rows.row_targets("HyPO", reference, config)
    torch.testing.assert_close(t1, delta_ref.clamp(min=0))
    torch.testing.assert_close(t2, (-delta_ref).clamp(min=0))
    predicted = rows.predicted_delta_pi("HyPO", reference, config, label_noise=0.2)
    # The optimum of (1 - q) l(beta (d - t1)) + q l(beta (-d - t2)): the gradient vanishes there, and it is positive on
    # the misaligned pairs (above the target 0), unlike DPO's.
    residual = optimum.optimality_residual(predicted, t1, t2, beta=config.beta, label_noise=0.2)
    torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-6, rtol=0)
    assert (predicted[delta_ref < 0] > 0).all()
    assert (rows.predicted_delta_pi("DPO", reference, config, label_noise=0.2)[delta_ref < -1] < 0).all()


# -- the audit's verdict ------------------------------------------------------------------------------------------------


def verdict_of(deltas, tmp_path, **config):
    """The audit's numbers on one-token pairs with the given delta_ref (summed == per-token)."""
    chosen = torch.full((len(deltas),), -2.0)
    ones = torch.ones(len(deltas))
    reference = ReferenceLogps(chosen, chosen - torch.tensor(deltas), ones, ones)
    args = METHODS["cpo"].config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=2.5, **config)
    report = reference_report(
        reference.chosen, reference.rejected, reference.chosen_lengths, reference.rejected_lengths, args
    )
    return analysis.analyze(reference, args, "cpo", report)


def test_the_verdict_can_recommend_hypo(tmp_path):
    # 20 misaligned pairs no cpo_gamma lifts under a cap of 1 logit; the aligned pairs sit at delta_ref 0.2, below
    # E-CPOC's floor of 0.5, which would raise all of them: HyPO changes the misaligned pairs only.
    numbers = verdict_of([-1.0] * 20 + [0.2] * 80, tmp_path, cpo_max_margin=1.0)
    verdict = numbers["verdict"]
    assert verdict.branch == "use_hypo" and "--method hypo" in verdict.text and "100%" in verdict.text
    assert numbers["hypo"]["lifted_fraction"] == 1.0 and numbers["hypo"]["floor_binding_fraction"] == 0.2
    # Aligned pairs above the floor: E-CPOC, which names HyPO as the variant without a floor.
    ecpoc = verdict_of([-1.0] * 20 + [1.0] * 80, tmp_path, cpo_max_margin=1.0)["verdict"]
    assert ecpoc.branch == "use_ecpoc" and "HyPO (--method hypo)" in ecpoc.text


def test_no_preference_signal_is_said_not_a_method(tmp_path):
    verdict = verdict_of([0.0] * 50, tmp_path)["verdict"]
    assert verdict.branch == "no_signal" and verdict.text.startswith("No preference signal") and verdict.caveat == ""
    assert "recommend" in verdict.text
    assert verdict_of([0.0] * 49 + [1.0], tmp_path)["verdict"].branch != "no_signal"  # one pair carries a signal
    assert analysis.BRANCHES[0] == "no_signal"


def test_the_audit_refuses_identical_pairs_in_one_line(tmp_path, capsys):
    import json

    from trl_cpo.scripts import audit

    tokenizer = build_tiny_tokenizer(WORDS)
    (tmp_path / "model").mkdir()
    build_tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = [{**pair, "rejected": pair["chosen"]} for pair in make_pairs(12, seed=1)]  # chosen == rejected
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    argv = ["--model_name_or_path", tmp_path / "model", "--dataset_name", tmp_path / "pairs.jsonl"]
    argv += ["--output_dir", tmp_path / "audit", "--use_cpu", "true", "--bf16", "false"]
    # All pairs identical: the shared validator refuses them before the model loads (issue 18), a one-line error; a
    # set with some signal too small to matter gets the "no_signal" verdict (the test above).
    assert audit.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "identical" in err
    assert not (tmp_path / "audit" / "audit.json").exists()
