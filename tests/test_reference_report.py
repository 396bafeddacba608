"""The reference report (issue 9): numbers against a by-hand computation, the Wilson interval, the recommended
cpo_gamma as a property, the warnings that name the fix, what the trainers log and write, `cpo_auto_gamma`, and
`ReferenceReportCallback` on a plain DPOTrainer."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from helpers import CPU, REPO, column_margins, cpu_args
from trl import DPOConfig, DPOTrainer

from trl_cpo import (
    CPOConfig,
    CPOTrainer,
    ECPOCConfig,
    ECPOCTrainer,
    ReferenceReport,
    ReferenceReportCallback,
    recommend_cpo_gamma,
    reference_report,
    wilson_interval,
)
from trl_cpo.losses import cpo_margin
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

SHIPPED_PAIRS = REPO / "recipes" / "data" / "tiny_prefs.jsonl"
REPORT_KEYS = {f"reference/{k}" for k in ReferenceReport.LOGGED_KEYS}


def random_reference(seed: int, n: int = 300, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(3, 80, (n,), generator=g).float()
    rejected_lengths = torch.randint(3, 80, (n,), generator=g).float()
    chosen = -(torch.rand(n, generator=g) * scale + 0.3) * chosen_lengths
    rejected = -(torch.rand(n, generator=g) * scale + 0.3) * rejected_lengths
    return chosen, rejected, chosen_lengths, rejected_lengths


def by_hand_lifted(chosen, rejected, chosen_lengths, rejected_lengths, *, beta, gamma, length_normalized, cap=10.0):
    """Share of misaligned pairs whose CPO target is >= 0, with the margin written out (per-token probabilities)."""
    lc, lr = chosen / chosen_lengths, rejected / rejected_lengths
    delta_ref = lc - lr if length_normalized else chosen - rejected
    margin = torch.clamp(gamma * (torch.exp(-lc.double()) + torch.exp(-lr.double())), max=cap)
    misaligned = delta_ref < 0
    return ((delta_ref.double() + margin / beta)[misaligned] >= 0).double().mean().item()


# -- pure functions ------------------------------------------------------------------------------------------------


def test_wilson_interval_matches_published_values():
    # Standard worked values of the 95% Wilson score interval (e.g. Newcombe 1998, Table I).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


@pytest.mark.parametrize("length_normalized", [True, False])
def test_report_numbers_by_hand(length_normalized):
    chosen, rejected, lc, lr = random_reference(0)
    loss_type = "sigmoid_norm" if length_normalized else "sigmoid"
    beta = 2.5 if length_normalized else 0.1
    config = CPOConfig(**CPU, beta=beta, loss_type=loss_type, cpo_gamma=0.02)
    report = reference_report(chosen, rejected, lc, lr, config)

    delta_ref = (chosen / lc - rejected / lr) if length_normalized else (chosen - rejected)
    misaligned = (delta_ref < 0).sum().item()
    n = len(chosen)
    assert report.num_pairs == n
    assert report.misaligned_fraction == misaligned / n
    p, z = misaligned / n, 1.959963984540054
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert report.misaligned_fraction_ci_low == pytest.approx(center - half)
    assert report.misaligned_fraction_ci_high == pytest.approx(center + half)
    middle = delta_ref.sort().values[n // 2 - 1 : n // 2 + 1]  # n is even: the median is the mean of the middle two
    assert report.delta_ref_quantiles["p50"] == pytest.approx(middle.double().mean().item(), abs=1e-6)
    expected_lift = by_hand_lifted(
        chosen, rejected, lc, lr, beta=beta, gamma=0.02, length_normalized=length_normalized
    )
    assert report.lifted_fraction == pytest.approx(expected_lift, abs=1e-9)
    margin = 0.02 * (torch.exp(-(chosen / lc).double()) + torch.exp(-(rejected / lr).double()))
    assert report.margin_at_cap_fraction == pytest.approx((margin >= 10.0).double().mean().item())
    assert report.cpo_gamma == 0.02
    logs = report.to_logs()
    absent = {"reference/floor_binding_fraction"}
    if report.recommended_cpo_gamma is None:  # unreachable under the cap: left out of the logs, reason in the report
        absent.add("reference/recommended_cpo_gamma")
        assert "cpo_max_margin" in report.recommendation
    assert set(logs) == REPORT_KEYS - absent
    assert all(math.isfinite(v) for v in logs.values())

    ecpoc = reference_report(chosen, rejected, lc, lr, ECPOCConfig(**CPU, loss_type=loss_type, ecpoc_gamma=0.3))
    assert ecpoc.floor_binding_fraction == pytest.approx((delta_ref < 0.3).float().mean().item())
    assert ecpoc.lifted_fraction is None and ecpoc.cpo_gamma is None
    assert "reference/floor_binding_fraction" in ecpoc.to_logs() and "reference/lifted_fraction" not in ecpoc.to_logs()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("length_normalized, beta", [(True, 2.5), (False, 0.1), (True, 0.5)])
@pytest.mark.parametrize("share", [0.5, 0.9, 1.0])
def test_recommended_gamma_is_the_smallest_that_lifts_the_share(seed, length_normalized, beta, share):
    chosen, rejected, lc, lr = random_reference(seed, scale=1.5)
    rec = recommend_cpo_gamma(chosen, rejected, lc, lr, beta=beta, length_normalized=length_normalized, share=share)
    if rec.gamma is None:  # the cap leaves too few pairs reachable: then the reachable share is below the ask
        assert rec.reachable_share < share and "cpo_max_margin" in rec.reason
        return
    at = by_hand_lifted(chosen, rejected, lc, lr, beta=beta, gamma=rec.gamma, length_normalized=length_normalized)
    below = by_hand_lifted(
        chosen, rejected, lc, lr, beta=beta, gamma=0.99 * rec.gamma, length_normalized=length_normalized
    )
    assert at >= share - 1e-12
    assert below < share
    # and the package's own margin agrees (float32), as the trainers compute it
    config = CPOConfig(
        **CPU, beta=beta, loss_type="sigmoid_norm" if length_normalized else "sigmoid", cpo_gamma=rec.gamma
    )
    assert reference_report(chosen, rejected, lc, lr, config, share=share).lifted_fraction >= share


def test_recommendation_none_with_a_reason():
    chosen, rejected, lc, lr = random_reference(1)
    # inverse_logp margins are negative: nothing can be lifted
    rec = recommend_cpo_gamma(chosen, rejected, lc, lr, beta=2.5, margin_type="inverse_logp")
    assert rec.gamma is None and "inverse_logp" in rec.reason and "ECPOCTrainer" in rec.reason
    # a cap below what the misaligned pairs need
    rec = recommend_cpo_gamma(chosen, rejected, lc, lr, beta=2.5, max_margin=0.01)
    assert rec.gamma is None and "cpo_max_margin=0.01" in rec.reason and rec.reachable_share < 0.9
    # no misaligned pair: DPO is fine, gamma 0
    rec = recommend_cpo_gamma(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.ones(1), torch.ones(1), beta=2.5)
    assert rec.gamma == 0.0


def test_warnings_name_the_fix():
    chosen, rejected, lc, lr = random_reference(2)
    capped = reference_report(chosen, rejected, lc, lr, CPOConfig(**CPU, cpo_gamma=50.0))
    assert capped.margin_at_cap_fraction > 0.5
    (message,) = [w for w in capped.warnings if "cpo_max_margin" in w]
    below = float(message.split("cpo_gamma below ")[1].split()[0])
    # following the advice does keep at least half of the margins under the cap
    assert (
        reference_report(chosen, rejected, lc, lr, CPOConfig(**CPU, cpo_gamma=below * 0.999)).margin_at_cap_fraction
        <= 0.5
    )

    weak = reference_report(chosen, rejected, lc, lr, CPOConfig(**CPU, cpo_gamma=1e-4))
    assert weak.lifted_fraction < 0.5
    (message,) = [w for w in weak.warnings if "lifts only" in w]
    assert f"cpo_gamma={weak.recommended_cpo_gamma:.4g}" in message and "ECPOCTrainer" in message
    assert not reference_report(
        chosen, rejected, lc, lr, CPOConfig(**CPU, cpo_gamma=weak.recommended_cpo_gamma)
    ).warnings
    # No cpo_gamma lifts with the released numerics: the warning gives the reason, naming E-CPOC once, in one sentence.
    negative = reference_report(chosen, rejected, lc, lr, CPOConfig(**CPU, cpo_margin_type="inverse_logp"))
    (message,) = [w for w in negative.warnings if "lifts only" in w]
    assert message.count("ECPOCTrainer") == 1 and ".;" not in message and message.endswith(".")


# -- in the trainers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    """A tiny Llama briefly trained by SFT on the shipped pairs (both completions), so its per-token log-probs are
    realistic (well above log(1/vocab)) and the reference gets a good share of pairs wrong."""
    rows = [json.loads(line) for line in SHIPPED_PAIRS.read_text().splitlines() if line.strip()]
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_llama(tokenizer, seed=0)
    batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    torch.manual_seed(0)
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return rows, tokenizer, model.state_dict(), model.config


def sft_model(shipped):
    from transformers import LlamaForCausalLM

    _, _, state, config = shipped
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model


def test_trainer_logs_the_report_once_prints_it_and_puts_it_on_the_card(shipped, tmp_path, capsys):
    rows, tokenizer, _, _ = shipped
    dataset = Dataset.from_list(rows[:32])
    args = CPOConfig(**cpu_args(tmp_path, max_steps=2, learning_rate=1e-4))
    trainer = CPOTrainer(model=sft_model(shipped), args=args, train_dataset=dataset, processing_class=tokenizer)
    ref = trainer.train_reference_logps
    expected = reference_report(ref.chosen, ref.rejected, ref.chosen_lengths, ref.rejected_lengths, args)
    assert trainer.reference_report == expected
    assert "Reference report (CPO)" in capsys.readouterr().out
    trainer.train()
    entries = [h for h in trainer.state.log_history if "reference/misaligned_fraction" in h]
    assert len(entries) == 1
    assert {k for k in entries[0] if k.startswith("reference/")} == set(expected.to_logs())
    assert entries[0]["reference/misaligned_fraction"] == expected.misaligned_fraction
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "Reference report (train set" in card and "misaligned (delta_ref < 0)" in card


def test_ecpoc_trainer_reports_floor_binding(shipped, tmp_path):
    rows, tokenizer, _, _ = shipped
    trainer = ECPOCTrainer(
        model=sft_model(shipped),
        args=ECPOCConfig(**cpu_args(tmp_path, max_steps=1)),
        train_dataset=Dataset.from_list(rows[:16]),
        processing_class=tokenizer,
    )
    report = trainer.reference_report
    assert report.method == "E-CPOC" and report.floor_binding_fraction is not None and report.lifted_fraction is None


def test_trainer_warns_when_cpo_lifts_too_few(shipped, tmp_path, caplog):
    rows, tokenizer, _, _ = shipped
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer = CPOTrainer(
            model=sft_model(shipped),
            args=CPOConfig(**cpu_args(tmp_path), cpo_gamma=1e-6),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert trainer.reference_report.misaligned_fraction > 0.1, "the SFT reference should get some pairs wrong"
    assert any("lifts only" in r.getMessage() and "cpo_auto_gamma" in r.getMessage() for r in caplog.records)


def test_auto_gamma_lifts_the_share_trains_and_resumes_with_the_same_gamma(shipped, tmp_path):
    rows, tokenizer, _, _ = shipped
    dataset = Dataset.from_list(rows)
    args = dict(cpu_args(tmp_path, max_steps=2, learning_rate=1e-4, save_strategy="steps", save_steps=1))
    trainer = CPOTrainer(
        model=sft_model(shipped),
        args=CPOConfig(**args, cpo_auto_gamma=0.9),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    report = trainer.reference_report
    gamma = trainer.args.cpo_gamma
    assert gamma != CPOConfig.cpo_gamma and report.cpo_gamma == gamma == report.recommended_cpo_gamma
    assert report.misaligned_fraction > 0.1 and report.lifted_fraction >= 0.9
    # the margins the loss uses are those of the chosen gamma
    ref = trainer.train_reference_logps
    margins = column_margins(trainer)
    expected = cpo_margin(*ref.per_token(), gamma=gamma)
    torch.testing.assert_close(margins, expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reference/cpo_gamma" in h]
    assert logged[0]["reference/cpo_gamma"] == pytest.approx(gamma)

    # A rebuilt run whose reference differs slightly (another seed of the same SFT would choose another gamma) keeps
    # the checkpoint's gamma on resume.
    perturbed = sft_model(shipped)
    with torch.no_grad():
        perturbed.lm_head.weight.mul_(1.05)
    resumed = CPOTrainer(
        model=perturbed,
        args=CPOConfig(**{**args, "max_steps": 3}, cpo_auto_gamma=0.9),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert resumed.args.cpo_gamma != pytest.approx(gamma, rel=1e-6), "the perturbation should change the choice"
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.args.cpo_gamma == pytest.approx(gamma, rel=1e-9)
    restored = column_margins(resumed)
    torch.testing.assert_close(restored, margins, rtol=1e-6, atol=1e-7)


def test_auto_gamma_refuses_an_unreachable_share(shipped, tmp_path):
    rows, tokenizer, _, _ = shipped
    trainer = CPOTrainer(
        model=sft_model(shipped),
        args=CPOConfig(**cpu_args(tmp_path), cpo_auto_gamma=1.0, cpo_max_margin=1e-3),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # checked as soon as the train set's reference exists: at the start of train(), before the first step
    with pytest.raises(ValueError, match="cpo_auto_gamma=1.0 cannot be met.*cpo_max_margin"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_auto_gamma_share_is_validated(bad):
    with pytest.raises(ValueError, match="cpo_auto_gamma"):
        CPOConfig(**CPU, cpo_auto_gamma=bad)


def test_callback_gives_a_dpo_run_the_same_report(shipped, tmp_path):
    rows, tokenizer, _, _ = shipped
    dataset = Dataset.from_list(rows[:32])
    dpo_args = DPOConfig(**cpu_args(tmp_path / "dpo", max_steps=1), loss_type=["sigmoid_norm"], beta=2.5)
    dpo = DPOTrainer(
        model=sft_model(shipped),
        ref_model=sft_model(shipped),
        args=dpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    callback = ReferenceReportCallback(dpo)
    dpo.add_callback(callback)
    dpo.train()
    cpo = CPOTrainer(
        model=sft_model(shipped),
        args=CPOConfig(**cpu_args(tmp_path / "cpo", max_steps=1)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert callback.report.to_logs() == pytest.approx(cpo.reference_report.to_logs(), rel=1e-5)
    (entry,) = [h for h in dpo.state.log_history if "reference/misaligned_fraction" in h]
    assert {k for k in entry if k.startswith("reference/")} == set(callback.report.to_logs())
