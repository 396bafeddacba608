import os

import pytest
import torch
from datasets import Dataset
from helpers import (
    column_margins,
    cpu_args,
    first_step_accuracy_is_roundoff,
    make_pairs,
    sequence_logps,
    train_logs,
)
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.losses import cpo_loss, cpo_margin, dpo_loss
from trl_cpo.metrics import U_FRACTION_ATOL, u_fraction
from trl_cpo.reference_store import REFERENCE_FILE
from trl_cpo.tiny import build_tiny_llama, build_tiny_qwen2

TRAJECTORY_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"]


#: Two architectures through the equivalence test: Llama, and Qwen2 (q/k/v biases, grouped-query attention, LM head
#: tied to the input embeddings), so the fused-LM-head path is not checked on one model family only.
ARCHITECTURES = {"llama": build_tiny_llama, "qwen2": build_tiny_qwen2}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize(
    "loss_type, num_pairs, extra",
    [
        ("sigmoid", 16, {}),
        ("sigmoid_norm", 16, {}),
        # an uneven last accumulation window: every micro-batch must count in the metrics, as in DPOTrainer's
        ("sigmoid_norm", 10, {"gradient_accumulation_steps": 3}),
    ],
)
def test_gamma_zero_reproduces_dpo_trajectory(tokenizer, tmp_path, loss_type, num_pairs, extra, architecture):
    build = ARCHITECTURES[architecture]
    train_dataset = Dataset.from_list(make_pairs(num_pairs, seed=0))
    common = cpu_args(tmp_path, max_steps=4, beta=0.5, loss_type=loss_type, **extra)
    dpo = DPOTrainer(
        model=build(tokenizer),
        args=DPOConfig(**common, precompute_ref_log_probs=True),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    cpo = CPOTrainer(
        model=build(tokenizer),
        args=CPOConfig(**common, cpo_gamma=0.0),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    dpo_logs, cpo_logs = train_logs(dpo), train_logs(cpo)
    assert len(dpo_logs) == len(cpo_logs) == 4
    for step, (dpo_log, cpo_log) in enumerate(zip(dpo_logs, cpo_logs)):
        for key in [*TRAJECTORY_KEYS, "rewards/accuracies"]:
            if first_step_accuracy_is_roundoff(step, key, dpo_log, cpo_log):
                continue
            assert cpo_log[key] == pytest.approx(dpo_log[key], rel=1e-5, abs=1e-6), key
    # the loss really moved, so the comparison covers training, not just the initial point
    assert cpo_logs[0]["loss"] != pytest.approx(cpo_logs[-1]["loss"], rel=1e-3)
    assert cpo_logs[0]["cpo_margin"] == 0.0


def test_positive_gamma_changes_the_trajectory(tokenizer, train_dataset, tmp_path):
    logs = {}
    for gamma in (0.0, 0.05):
        trainer = CPOTrainer(
            model=build_tiny_llama(tokenizer),
            args=CPOConfig(**cpu_args(tmp_path, max_steps=3), cpo_gamma=gamma),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
        logs[gamma] = train_logs(trainer)
    assert logs[0.05][0]["loss"] > logs[0.0][0]["loss"] + 1e-3  # a positive margin raises the loss
    assert logs[0.05][0]["cpo_margin"] > 0
    assert logs[0.05][-1]["loss"] != pytest.approx(logs[0.0][-1]["loss"], rel=1e-3)


@pytest.mark.parametrize("trainer_cls, config_cls", [(CPOTrainer, CPOConfig), (ECPOCTrainer, ECPOCConfig)])
def test_logged_metrics_match_by_hand_computation(tokenizer, tmp_path, trainer_cls, config_cls):
    """One batch holding every pair, a policy different from the reference: U, misalignment and rewards by hand."""
    rows = make_pairs(12, seed=3)
    policy, reference = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    (pc, pr), (lc, lr) = sequence_logps(policy, tokenizer, rows)
    (rc, rr), _ = sequence_logps(reference, tokenizer, rows)
    expected_u = u_fraction(pc / lc, pr / lr, rc / lc, rr / lr, atol=U_FRACTION_ATOL).item()
    assert 0 < expected_u < 1  # the check below can fail in both directions

    args = config_cls(**cpu_args(tmp_path, per_device_train_batch_size=12, max_steps=1, beta=0.5))
    trainer = trainer_cls(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    log = train_logs(trainer)[0]
    assert log["u_fraction"] == pytest.approx(expected_u)
    assert log["ref_misaligned_fraction"] == pytest.approx(((rc / lc) < (rr / lr)).float().mean().item())
    # DPOTrainer's reward metrics keep their DPO meaning: beta * (logp - ref_logp), summed, unshifted by the margin
    assert log["rewards/chosen"] == pytest.approx((0.5 * (pc - rc)).mean().item(), abs=1e-4)
    assert log["rewards/rejected"] == pytest.approx((0.5 * (pr - rr)).mean().item(), abs=1e-4)
    accuracy = ((pc - rc) > (pr - rr)).float().mean().item()
    assert log["rewards/accuracies"] == pytest.approx(accuracy)
    if trainer_cls is CPOTrainer:
        # the default space is per-token ('sigmoid_norm'), where the margin reads the same per-token log-probs
        assert log["cpo_margin"] == pytest.approx(cpo_margin(rc / lc, rr / lr, gamma=0.05).mean().item(), rel=1e-4)
    else:
        delta_ref = rc / lc - rr / lr
        target = delta_ref + torch.nn.functional.softplus(2.0 * (0.5 - delta_ref)) / 2.0
        assert log["ecpoc_target"] == pytest.approx(target.mean().item(), rel=1e-4)


@pytest.mark.parametrize(
    "loss_type, margin_type",
    [
        ("sigmoid_norm", "inverse_prob"),
        ("sigmoid", "inverse_prob"),
        ("sigmoid_norm", "inverse_logp"),
        ("sigmoid", "inverse_logp"),
    ],
)
def test_logged_loss_is_the_cpo_loss_by_hand(tokenizer, tmp_path, loss_type, margin_type):
    rows = make_pairs(12, seed=4)
    policy, reference = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    (pc, pr), (lc, lr) = sequence_logps(policy, tokenizer, rows)
    (rc, rr), _ = sequence_logps(reference, tokenizer, rows)
    # The margin always reads per-token reference log-probs; delta_pi and delta_ref are in the loss's space.
    token_rc, token_rr = rc / lc, rr / lr
    m = cpo_margin(token_rc, token_rr, gamma=0.3, margin_type=margin_type, max_margin=50.0)
    assert (m.abs() < 50.0).all()  # uncapped: the check below sees the margin itself
    if loss_type == "sigmoid_norm":
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    expected = -torch.nn.functional.logsigmoid(0.5 * ((pc - pr) - (rc - rr)) - m).mean()
    # the pure function says the same when handed the per-token reference log-probs for the margin
    pure = cpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.5,
        gamma=0.3,
        margin_type=margin_type,
        max_margin=50.0,
        ref_chosen_token_logps=token_rc,
        ref_rejected_token_logps=token_rr,
    )
    torch.testing.assert_close(pure.mean(), expected)
    args = CPOConfig(
        **cpu_args(tmp_path, per_device_train_batch_size=12, max_steps=1, beta=0.5),
        loss_type=loss_type,
        cpo_gamma=0.3,
        cpo_margin_type=margin_type,
        cpo_max_margin=50.0,
    )
    trainer = CPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    log = train_logs(trainer)[0]
    assert log["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert log["cpo_margin"] == pytest.approx(m.mean().item(), rel=1e-4)
    # and it is not DPO's: the margin matters at these settings
    assert abs(log["loss"] - dpo_loss(pc, pr, rc, rr, beta=0.5).mean().item()) > 1e-2


def test_doubling_cpo_gamma_doubles_an_uncapped_margin_in_both_spaces(tokenizer, train_dataset, tmp_path):
    """The margin is a per-token-perplexity margin: linear in cpo_gamma below the cap, and the same in both spaces.

    On summed log-probs the paper's sequence-level 1/pi_ref would sit at the cap on every pair, so doubling gamma
    would change nothing; per-token, it doubles the margin.
    """
    (rc, rr), (lc, lr) = sequence_logps(build_tiny_llama(tokenizer, seed=0), tokenizer, train_dataset.to_list())
    margins = {}
    for loss_type in ("sigmoid", "sigmoid_norm"):
        for gamma in (0.05, 0.1):
            trainer = CPOTrainer(
                model=build_tiny_llama(tokenizer, seed=0),
                args=CPOConfig(**cpu_args(tmp_path, loss_type=loss_type), cpo_gamma=gamma, cpo_max_margin=1e4),
                train_dataset=train_dataset,
                processing_class=tokenizer,
            )
            margin = trainer.reference_margin(trainer.train_reference_logps)
            # the margin the loss step computes from the batch's reference columns is that margin
            columns = column_margins(trainer)
            torch.testing.assert_close(columns, margin.float())
            margins[loss_type, gamma] = margin
    for loss_type in ("sigmoid", "sigmoid_norm"):
        small, large = margins[loss_type, 0.05], margins[loss_type, 0.1]
        assert (small > 0).all() and (large < 1e4).all()
        torch.testing.assert_close(large, 2 * small, rtol=1e-5, atol=0)
        # by hand, from per-token reference log-probs: gamma * (exp(-logp_w / n_w) + exp(-logp_l / n_l))
        torch.testing.assert_close(small, 0.05 * (torch.exp(-rc / lc) + torch.exp(-rr / lr)), rtol=1e-4, atol=1e-5)
    # per-token whatever the loss space: the summed run gets the same margin, not one pinned at the cap
    torch.testing.assert_close(margins["sigmoid", 0.05], margins["sigmoid_norm", 0.05])


def test_eval_metrics_and_eval_set_passed_later(model, tokenizer, train_dataset, eval_dataset, tmp_path):
    # full fine-tuning keeps no reference after training starts unless one is given (DPOTrainer's rule too)
    trainer = CPOTrainer(
        model=model,
        ref_model=build_tiny_llama(tokenizer, seed=7),
        args=CPOConfig(**cpu_args(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=2)),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and {"eval_u_fraction", "eval_ref_misaligned_fraction", "eval_cpo_margin"} <= set(evals[0])
    later = Dataset.from_list(make_pairs(6, seed=9))
    metrics = trainer.evaluate(eval_dataset=later)
    assert 0 <= metrics["eval_u_fraction"] <= 1 and metrics["eval_cpo_margin"] > 0
    assert len(trainer.eval_reference_logps["eval"]) == 6
    again = trainer.evaluate(eval_dataset=trainer.eval_dataset)  # already carries margin columns
    assert again["eval_cpo_margin"] == pytest.approx(evals[0]["eval_cpo_margin"], rel=1e-5)


def test_precompute_uses_no_reference_forward_during_training(model, tokenizer, train_dataset, tmp_path):
    trainer = CPOTrainer(
        model=model, args=CPOConfig(**cpu_args(tmp_path)), train_dataset=train_dataset, processing_class=tokenizer
    )
    assert trainer.ref_model is None  # nothing to run a reference forward with
    trainer.precompute_reference()  # what train() runs first, before the first step
    calls = []
    original = trainer.compute_ref_log_probs
    trainer.compute_ref_log_probs = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.train()
    assert calls == []
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)


def test_lora_reference_is_the_adapter_free_base(model, tokenizer, train_dataset, tmp_path):
    rows = train_dataset.to_list()
    (base_chosen, base_rejected), _ = sequence_logps(model, tokenizer, rows)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = CPOTrainer(
        model=model,
        args=CPOConfig(**cpu_args(tmp_path, learning_rate=5e-2, max_steps=3)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    reference = trainer.train_reference_logps
    torch.testing.assert_close(reference.chosen, base_chosen, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference.rejected, base_rejected, atol=1e-4, rtol=1e-4)
    logs = train_logs(trainer)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    # the base stayed frozen and the adapter moved the policy away from it
    base = trainer.model.get_base_model()
    for name, value in base_state.items():
        peft_name = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        torch.testing.assert_close(base.state_dict()[peft_name], value)
    (policy_chosen, _), _ = sequence_logps(trainer.model, tokenizer, rows)
    assert not torch.allclose(policy_chosen, base_chosen, atol=1e-3)


def test_resume_uses_the_checkpoint_margins(tokenizer, train_dataset, tmp_path):
    """Resuming with a model rebuilt from another init still trains against the original reference."""
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    full = CPOTrainer(
        model=build_tiny_llama(tokenizer, seed=0),
        args=CPOConfig(**cpu_args(tmp_path / "full", **args)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    full_logs = train_logs(full)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / REFERENCE_FILE).is_file()

    resumed = CPOTrainer(
        model=build_tiny_llama(tokenizer, seed=123),  # another reference: other margins unless restored
        args=CPOConfig(**cpu_args(tmp_path / "full", **args)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    rebuilt_margin = column_margins(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    restored_margin = column_margins(resumed)
    torch.testing.assert_close(restored_margin, column_margins(full))
    assert not torch.allclose(rebuilt_margin, restored_margin)
    resumed_logs = [h for h in resumed.state.log_history if "loss" in h and "train_runtime" not in h]
    for full_log, resumed_log in zip(full_logs[2:], resumed_logs[-2:]):
        assert resumed_log["step"] == full_log["step"]
        assert resumed_log["loss"] == pytest.approx(full_log["loss"], rel=1e-4)
        assert resumed_log["cpo_margin"] == pytest.approx(full_log["cpo_margin"], rel=1e-5)


@pytest.mark.parametrize("other_size", [8, 16])
def test_resume_with_other_training_data_fails(tokenizer, train_dataset, tmp_path, other_size):
    args = CPOConfig(**cpu_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    CPOTrainer(
        model=build_tiny_llama(tokenizer), args=args, train_dataset=train_dataset, processing_class=tokenizer
    ).train()
    other = CPOTrainer(
        model=build_tiny_llama(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(make_pairs(other_size, seed=5)),  # 16: same size, other pairs
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="same training data"):
        other.train(resume_from_checkpoint=True)


def test_resume_restores_eval_references_even_for_an_eval_set_named_train(tokenizer, train_dataset, tmp_path):
    evals = {"train": Dataset.from_list(make_pairs(4, seed=6)), "test": Dataset.from_list(make_pairs(6, seed=7))}
    args = CPOConfig(**cpu_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    first = CPOTrainer(
        model=build_tiny_llama(tokenizer, seed=0),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=evals,
        processing_class=tokenizer,
    )
    assert len(first.train_reference_logps) == 16 and len(first.eval_reference_logps["train"]) == 4
    first.train()
    resumed = CPOTrainer(
        model=build_tiny_llama(tokenizer, seed=123),  # another reference
        args=CPOConfig(**cpu_args(tmp_path, max_steps=3, save_strategy="no")),
        train_dataset=train_dataset,
        eval_dataset=evals,
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=True)
    for name in ("train", "test"):
        torch.testing.assert_close(
            column_margins(resumed, name),
            column_margins(first, name),
        )


def test_checkpoint_holds_the_reference_before_it_is_pushed(model, tokenizer, train_dataset, tmp_path):
    seen = []
    trainer = CPOTrainer(
        model=model,
        args=CPOConfig(**cpu_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    # hub_strategy="checkpoint" uploads the folder from inside Trainer._save_checkpoint, once it is otherwise complete;
    # push_to_hub is switched on after __init__ so that no Hub repository is created.
    trainer.args.push_to_hub = True

    def record(output_dir):
        seen.append(sorted(os.listdir(output_dir)))

    trainer._push_from_checkpoint = record
    trainer.train()
    assert len(seen) == 1
    assert {REFERENCE_FILE, "trainer_state.json", "model.safetensors"} <= set(seen[0])
    assert "save_to_json" not in vars(trainer.state)  # the save's hook is gone once the save is done


def test_bf16_training_stays_finite(model, tokenizer, train_dataset, tmp_path):
    for trainer_cls, config_cls in [(CPOTrainer, CPOConfig), (ECPOCTrainer, ECPOCConfig)]:
        trainer = trainer_cls(
            model=build_tiny_llama(tokenizer),
            args=config_cls(**cpu_args(tmp_path, bf16=True, max_steps=2)),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
        for log in train_logs(trainer):
            for key in ("loss", "grad_norm", "u_fraction", "rewards/chosen"):
                assert torch.isfinite(torch.tensor(log[key])), (trainer_cls.__name__, key)


@pytest.mark.parametrize("sft_weight", [0.5, 2.0])
def test_loss_weights_mix_sft_into_the_logged_loss_by_hand(tokenizer, tmp_path, sft_weight):
    """loss = 1.0 * CPO term + sft_weight * SFT NLL, the NLL being the mean over the chosen completion tokens."""
    rows = make_pairs(12, seed=4)
    policy, reference = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    (pc, pr), (lc, lr) = sequence_logps(policy, tokenizer, rows)
    (rc, rr), _ = sequence_logps(reference, tokenizer, rows)
    cpo_term = cpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=0.5, gamma=0.3).mean()
    sft_nll = -pc.sum() / lc.sum()
    args = CPOConfig(
        **cpu_args(tmp_path, per_device_train_batch_size=12, max_steps=1, beta=0.5),
        loss_type=["sigmoid_norm", "sft"],
        loss_weights=[1.0, sft_weight],
        cpo_gamma=0.3,
    )
    trainer = CPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    log = train_logs(trainer)[0]
    assert sft_nll > 1.0  # a weight ignored (or applied to the wrong term) would move the loss by far more than rel
    assert log["loss"] == pytest.approx((cpo_term + sft_weight * sft_nll).item(), rel=1e-4)
    # the margin still reaches the preference term only: the logged margin is the one of the CPO term alone
    expected_margin = cpo_margin(rc / lc, rr / lr, gamma=0.3).mean()
    assert log["cpo_margin"] == pytest.approx(expected_margin.item(), rel=1e-4)


@pytest.mark.parametrize("trainer_cls, config_cls", [(CPOTrainer, CPOConfig), (ECPOCTrainer, ECPOCConfig)])
def test_eval_rewards_keep_dpo_meaning(tokenizer, tmp_path, trainer_cls, config_cls):
    """eval_rewards/* are DPO's beta * (logp - ref_logp) on summed log-probs, not shifted by the method's margin."""
    rows = make_pairs(8, seed=5)
    reference = build_tiny_llama(tokenizer, seed=2)
    trainer = trainer_cls(
        model=build_tiny_llama(tokenizer, seed=1),
        ref_model=reference,
        args=config_cls(**cpu_args(tmp_path, max_steps=2, beta=0.5, per_device_eval_batch_size=8)),
        train_dataset=Dataset.from_list(make_pairs(8, seed=0)),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()  # evaluate the trained policy, not its initial weights
    metrics = trainer.evaluate()
    (pc, pr), (lc, _) = sequence_logps(trainer.model.eval(), tokenizer, rows)
    (rc, rr), _ = sequence_logps(reference, tokenizer, rows)
    chosen, rejected = 0.5 * (pc - rc), 0.5 * (pr - rr)
    assert metrics["eval_rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert metrics["eval_rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-4)
    assert metrics["eval_rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-4)
    assert metrics["eval_rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
    # what DPOTrainer computed from the batch the loss saw (reference raised by margin / beta, per token) differs
    margin = column_margins(trainer, "eval")
    shifted = 0.5 * (pc - (rc + margin / 0.5 * lc))
    assert abs(shifted.mean().item() - chosen.mean().item()) > 1e-2


def test_model_card_and_tags_name_the_method(model, tokenizer, train_dataset, tmp_path):
    trainer = ECPOCTrainer(
        model=model,
        args=ECPOCConfig(**cpu_args(tmp_path, max_steps=1), ecpoc_tau=4.0),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-ecpoc", dataset_name="local/pairs")
    card = open(os.path.join(tmp_path, "README.md"), encoding="utf-8").read()
    assert "E-CPOC" in card and "Constrained Preference Optimization" in card and "2605.20834" in card
    assert "not TRL's Contrastive Preference Optimization" in card
    assert "| `ecpoc_tau` | `4.0` |" in card and "| `ecpoc_gamma` | `0.5` |" in card and "local/pairs" in card
    assert "length_normalize" not in card and "| `loss_type` | `['sigmoid_norm']` |" in card
    assert "trl-cpo" in card and "e-cpoc" in card
    tags = set(trainer.model.model_tags)
    assert {"trl-cpo", "e-cpoc"} <= tags and "cpo" not in tags  # never TRL's Contrastive PO tag
