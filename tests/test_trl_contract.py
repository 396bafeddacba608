"""Contract tests: each TRL / transformers internal trl_cpo relies on (`trl_cpo._trl_compat.ASSUMPTIONS`), checked
against the installed version by running it on a tiny model wherever its behaviour can be run.

Each check sits in `with contract("<key>")`, which turns any failure (a missing name, a wrong value, a crash) into an
AssertionError whose message names the assumption, the trl_cpo code relying on it and the TRL function (file:line,
installed version) it came from. A TRL upgrade that breaks one fails here, by name, rather than in a distant test.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from helpers import REPO, cpu_args, free_port, make_pairs, subprocess_env
from huggingface_hub import ModelCard
from peft import LoraConfig
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_cpo import _trl_compat as compat
from trl_cpo._trl_compat import contract
from trl_cpo.tiny import build_tiny_llama

BETA = 0.5
PAIRS = 5


def dpo_trainer(tokenizer, tmp_path, trainer_cls=DPOTrainer, rows=None, **config):
    """A DPOTrainer with a separate reference (another init) and precomputed reference log-probs."""
    args = dict(cpu_args(tmp_path, beta=BETA, precompute_ref_log_probs=True), **config)
    return trainer_cls(
        model=build_tiny_llama(tokenizer, seed=1),
        ref_model=build_tiny_llama(tokenizer, seed=2),
        args=DPOConfig(**args),
        train_dataset=Dataset.from_list(rows or make_pairs(PAIRS, seed=11)),
        processing_class=tokenizer,
    )


def first_batch(trainer, n=PAIRS):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


@torch.no_grad()
def token_logps_by_hand(model, batch):
    """[2 * pairs, seq_len - 1] log-probs of each next token from plain logits, zero outside the completion."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    token = torch.log_softmax(logits, dim=-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return token * batch["completion_mask"][:, 1:]


def summed_by_hand(model, batch):
    return token_logps_by_hand(model, batch).sum(dim=1).chunk(2)


class FusedCalls:
    """Forward hook recording each call of a model: whether fused_lm_head was passed, and the output."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(
            lambda module, args, kwargs, output: self.calls.append((kwargs.get("fused_lm_head"), output)),
            with_kwargs=True,
        )


# -- batch layout and collator ----------------------------------------------------------------------------------------


def test_collator_builds_the_chosen_then_rejected_batch(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path)
    rows = [trainer.train_dataset[i] for i in range(PAIRS)]
    with contract("collator"):
        assert isinstance(trainer.data_collator, compat.preference_collator_class()), type(trainer.data_collator)
        assert set(compat.TOKENIZED_COLUMNS) <= set(trainer.train_dataset.column_names)
        batch = trainer.data_collator(rows)
        # max_length truncates each prompt + completion in the collator; the tokenized columns stay whole
        short = dpo_trainer(tokenizer, tmp_path / "short", max_length=5)
        row = next(r for r in short.train_dataset if len(r["prompt_ids"]) + len(r["chosen_ids"]) > 5)
        truncated = short.data_collator([row])
        assert truncated["input_ids"][0].tolist() == (row["prompt_ids"] + row["chosen_ids"])[:5]
    with contract("batch_layout"):
        assert {"input_ids", "attention_mask", compat.COMPLETION_MASK, *compat.REFERENCE_COLUMNS} <= set(batch)
        assert batch["input_ids"].shape[0] == 2 * PAIRS
        for i, row in enumerate(rows):
            for half, key in ((0, "chosen_ids"), (1, "rejected_ids")):
                r = half * PAIRS + i
                n = len(row["prompt_ids"]) + len(row[key])
                assert batch["input_ids"][r, :n].tolist() == row["prompt_ids"] + row[key], (r, key)
                assert batch["attention_mask"][r].sum().item() == n
                mask = batch[compat.COMPLETION_MASK][r]
                assert mask[: len(row["prompt_ids"])].sum() == 0 and mask[len(row["prompt_ids"]) : n].all()
                assert mask.sum().item() == len(row[key])
        for key in compat.REFERENCE_COLUMNS:
            assert batch[key].shape == (PAIRS,)
            torch.testing.assert_close(batch[key], torch.tensor([row[key] for row in rows]))


# -- the loss ---------------------------------------------------------------------------------------------------------


def test_policy_forward_is_one_fused_lm_head_call_with_log_probs(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path)
    batch = first_batch(trainer)
    recorder = FusedCalls(trainer.model)
    trainer.compute_loss(trainer.model, batch)
    recorder.handle.remove()
    with contract("fused_lm_head"):
        fused = [output for flag, output in recorder.calls if flag]
        assert len(fused) == 1 and len(recorder.calls) == 1, [flag for flag, _ in recorder.calls]
        assert compat.fused_head_log_probs({"fused_lm_head": True}, fused[0]) is fused[0].log_probs
        log_probs = fused[0].log_probs.detach()
        seq_len = batch["input_ids"].shape[1]
        assert log_probs.shape == (2 * PAIRS, seq_len - 1), log_probs.shape
        expected = token_logps_by_hand(trainer.model, batch)
        assert (log_probs[batch[compat.COMPLETION_MASK][:, 1:] == 0] == 0).all()
        torch.testing.assert_close(log_probs, expected, atol=1e-4, rtol=1e-4)
        for got, want in zip(
            compat.summed_completion_logps(log_probs, batch[compat.COMPLETION_MASK]), expected.sum(1).chunk(2)
        ):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # The same call made outside the loss (DiagnosticsCallback's per-pair pass) gives the same log-probs.
        torch.testing.assert_close(compat.fused_forward_log_probs(trainer.model, batch).detach(), log_probs)


def test_sigmoid_loss_reads_the_reference_from_the_batch(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path, loss_type="sigmoid")
    batch = first_batch(trainer)
    pc, pr = summed_by_hand(trainer.model, batch)
    shift = torch.linspace(-2.0, 3.0, PAIRS)
    with contract("loss_reads_batch_reference"):
        for s in (torch.zeros(PAIRS), shift):
            shifted = {**batch, compat.REF_CHOSEN_LOGPS: batch[compat.REF_CHOSEN_LOGPS] + s}
            rc, rr = shifted[compat.REF_CHOSEN_LOGPS], shifted[compat.REF_REJECTED_LOGPS]
            expected = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
            loss = trainer.compute_loss(trainer.model, shifted)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-5), (s.tolist(), loss.item(), expected.item())


def test_live_trainer_reads_the_batch_reference_inside_the_switch_and_runs_no_reference_forward(tokenizer, tmp_path):
    precomputed = dpo_trainer(tokenizer, tmp_path / "pre", loss_type="sigmoid")
    batch = first_batch(precomputed)
    live = dpo_trainer(tokenizer, tmp_path / "live", loss_type="sigmoid", precompute_ref_log_probs=False)
    pc, pr = summed_by_hand(live.model, batch)
    rc, rr = batch[compat.REF_CHOSEN_LOGPS] + 1.5, batch[compat.REF_REJECTED_LOGPS]
    forwards = []
    live.ref_model.register_forward_hook(lambda *_: forwards.append(1))
    with contract("loss_reads_batch_reference"):
        assert live.precompute_ref_logps is False
        with compat.loss_reads_batch_reference(live):
            loss = live.compute_loss(live.model, {**batch, compat.REF_CHOSEN_LOGPS: rc})
        assert live.precompute_ref_logps is False  # restored
        assert forwards == []
        expected = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        # outside the switch the live trainer runs its own reference forward and ignores the batch's columns
        live.compute_loss(live.model, {**batch, compat.REF_CHOSEN_LOGPS: rc})
        assert forwards == [1]


def sigmoid_norm_by_hand(pc, pr, rc, rr, chosen_count, rejected_count):
    return -F.logsigmoid(BETA * ((pc - rc) / chosen_count - (pr - rr) / rejected_count)).mean()


def test_sigmoid_norm_divides_by_the_clamped_completion_token_count(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path, loss_type="sigmoid_norm")
    batch = first_batch(trainer)
    pc, pr = summed_by_hand(trainer.model, batch)
    rc, rr = batch[compat.REF_CHOSEN_LOGPS], batch[compat.REF_REJECTED_LOGPS]
    chosen_mask, rejected_mask = batch[compat.COMPLETION_MASK].chunk(2)
    nc, nr = chosen_mask.sum(1).float(), rejected_mask.sum(1).float()
    expected = sigmoid_norm_by_hand(pc, pr, rc, rr, nc, nr)
    # the check can fail: counting one token more per chosen completion moves the loss past the tolerance
    assert abs(sigmoid_norm_by_hand(pc, pr, rc, rr, nc + 1, nr) / expected - 1) > 1e-4
    with contract("sigmoid_norm_lengths"):
        for got, want in zip(compat.sigmoid_norm_lengths(batch[compat.COMPLETION_MASK]), (nc, nr)):
            torch.testing.assert_close(got, want)
        loss = trainer.compute_loss(trainer.model, batch)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), (loss.item(), expected.item())
        # An empty chosen completion (count 0) is divided by 1, not 0 (which would give inf / nan).
        mask = batch[compat.COMPLETION_MASK].clone()
        mask[0] = 0
        pc, pr = summed_by_hand(trainer.model, {**batch, compat.COMPLETION_MASK: mask})
        nc = mask.chunk(2)[0].sum(1).float()
        assert nc[0] == 0 and pc[0] == 0
        assert compat.sigmoid_norm_lengths(mask)[0][0] == 1
        loss = trainer.compute_loss(trainer.model, {**batch, compat.COMPLETION_MASK: mask})
        expected = sigmoid_norm_by_hand(pc, pr, rc, rr, nc.clamp(min=1), nr)
        assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_weights_weigh_the_mean_of_each_term(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    batch = first_batch(trainer)
    token = token_logps_by_hand(trainer.model, batch)
    pc, pr = token.sum(1).chunk(2)
    rc, rr = batch[compat.REF_CHOSEN_LOGPS], batch[compat.REF_REJECTED_LOGPS]
    sigmoid = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
    chosen_tokens = batch[compat.COMPLETION_MASK][:PAIRS, 1:].sum()
    sft = -token[:PAIRS].sum() / chosen_tokens
    with contract("loss_weights"):
        loss = trainer.compute_loss(trainer.model, batch)
        assert loss.item() == pytest.approx((sigmoid + 0.5 * sft).item(), rel=1e-5), (loss.item(), sigmoid, sft)
        # The SFT term reads no reference: shifting the reference changes only the preference term.
        shifted = {**batch, compat.REF_CHOSEN_LOGPS: rc + 1.0}
        shifted_sigmoid = -F.logsigmoid(BETA * ((pc - rc - 1.0) - (pr - rr))).mean()
        loss = trainer.compute_loss(trainer.model, shifted)
        assert loss.item() == pytest.approx((shifted_sigmoid + 0.5 * sft).item(), rel=1e-5)


def test_compute_ref_log_probs_sums_the_reference_and_disables_the_adapter(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path)
    batch = first_batch(trainer)
    with contract("compute_ref_log_probs"):
        got = compat.reference_logps(trainer, trainer.ref_model, batch)
        for g, want in zip(got, summed_by_hand(trainer.ref_model, batch)):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
    # PEFT without ref_model: the reference is the base model, read with the adapter disabled.
    base = build_tiny_llama(tokenizer, seed=3)
    base_logps = summed_by_hand(base, batch)
    peft = DPOTrainer(
        model=base,
        args=DPOConfig(**cpu_args(tmp_path / "peft", beta=BETA)),
        train_dataset=Dataset.from_list(make_pairs(PAIRS, seed=11)),
        processing_class=tokenizer,
        # init_lora_weights=False: a random adapter, so the policy differs from the base from the start
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with contract("compute_ref_log_probs"):
        assert peft.ref_model is None
        policy_logps = summed_by_hand(peft.model, batch)
        assert not torch.allclose(policy_logps[0], base_logps[0], atol=1e-3), "the adapter should change the policy"
        for g, want in zip(compat.reference_logps(peft, peft.model, batch), base_logps):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)


def test_live_reference_forwards_follow_the_policy_forward_in_compute_loss(tokenizer, tmp_path):
    peft = DPOTrainer(
        model=build_tiny_llama(tokenizer, seed=3),
        args=DPOConfig(**cpu_args(tmp_path / "peft", beta=BETA)),
        train_dataset=Dataset.from_list(make_pairs(PAIRS, seed=11)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch = compat.prepare_inputs(peft, first_batch(peft))
    live = dpo_trainer(tokenizer, tmp_path / "live", precompute_ref_log_probs=False)
    with contract("loss_forwards"):
        # PEFT without ref_model: the policy's fused forward, then the same model's with the adapter disabled.
        policy_calls = FusedCalls(peft.model)
        peft.compute_loss(peft.model, batch)
        fused = [output.log_probs.detach() for flag, output in policy_calls.calls if flag]
        with peft.model.disable_adapter():
            base = compat.fused_forward_log_probs(peft.model, batch).detach()
        assert len(fused) == 2 and torch.equal(fused[1], base) and not torch.allclose(fused[0], base)
        # A ref_model: the policy's one fused forward, and the ref_model's.
        policy_calls, ref_calls = FusedCalls(live.model), FusedCalls(live.ref_model)
        live.compute_loss(live.model, first_batch(live))
        assert [flag for flag, _ in policy_calls.calls] == [True] and [flag for flag, _ in ref_calls.calls] == [True]
        # Training and evaluation call the instance's compute_loss once per micro-batch (a callback may wrap it).
        seen, compute_loss = [], peft.compute_loss
        peft.compute_loss = lambda *args, **kwargs: seen.append(peft.model.training) or compute_loss(*args, **kwargs)
        peft.train()
        peft.evaluate(peft.train_dataset)
        assert seen == [True] * peft.state.global_step + [False] * -(-PAIRS // peft.args.per_device_eval_batch_size)


# -- metrics ----------------------------------------------------------------------------------------------------------


def test_reward_metrics_get_one_append_per_call_and_log_averages_every_list(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path, loss_type="sigmoid")
    batch = first_batch(trainer)
    pc, pr = summed_by_hand(trainer.model, batch)
    rc, rr = batch[compat.REF_CHOSEN_LOGPS], batch[compat.REF_REJECTED_LOGPS]
    chosen, rejected = BETA * (pc - rc), BETA * (pr - rr)
    expected = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }
    with contract("metric_lists"):
        trainer.model.train()
        assert compat.metrics_mode(trainer) == "train"
        for _ in range(2):
            trainer.compute_loss(trainer.model, batch)
        lists = compat.metric_lists(trainer, "train")
        assert set(compat.REWARD_METRICS) == set(expected)
        for key, value in expected.items():
            assert len(lists[key]) == 2, (key, lists[key])
            assert lists[key][-1] == pytest.approx(value.item(), abs=1e-4), key
        trainer.model.eval()
        assert compat.metrics_mode(trainer) == "eval"
        trainer.compute_loss(trainer.model, batch)
        evals = compat.metric_lists(trainer, "eval")
        assert all(len(evals[key]) == 1 for key in compat.REWARD_METRICS)
        evals["extra_metric"].extend([1.0, 3.0])  # a key trl_cpo adds: averaged and prefixed like DPO's own
        trainer.log({})
        logged = trainer.state.log_history[-1]
        assert logged["eval_extra_metric"] == pytest.approx(2.0)
        assert logged["eval_rewards/chosen"] == pytest.approx(expected["rewards/chosen"].item(), abs=1e-4)
        assert not any(compat.metric_lists(trainer, "eval").values())


# -- precompute -------------------------------------------------------------------------------------------------------


class PrecomputeSpy(DPOTrainer):
    """Records each `_precompute_ref_logps` call and what the trainer looked like at that moment."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        calls = self.__dict__.setdefault("precompute_calls", [])
        calls.append(
            {
                "name": name,
                "batch_size": batch_size,
                "rows": len(dataset),
                "tokenized": set(compat.TOKENIZED_COLUMNS) <= set(dataset.column_names),
                "is_train_dataset": dataset is self.train_dataset,
                "has_engine_attribute": hasattr(self, "_precompute_engine"),
                "engine": getattr(self, "_precompute_engine", "missing"),
                "ref_model": self.ref_model,
            }
        )
        return super()._precompute_ref_logps(dataset, name, batch_size)


def test_precompute_hook_is_called_once_per_dataset_in_init_and_evaluate(tokenizer, tmp_path):
    evals = {"a": Dataset.from_list(make_pairs(6, seed=12)), "b": Dataset.from_list(make_pairs(4, seed=13))}
    trainer = PrecomputeSpy(
        model=build_tiny_llama(tokenizer, seed=1),
        ref_model=build_tiny_llama(tokenizer, seed=2),
        args=DPOConfig(**cpu_args(tmp_path, precompute_ref_log_probs=True, per_device_eval_batch_size=3)),
        train_dataset=Dataset.from_list(make_pairs(7, seed=11)),
        eval_dataset=evals,
        processing_class=tokenizer,
    )
    with contract("precompute_hook"):
        calls = trainer.precompute_calls
        assert [(c["name"], c["batch_size"], c["rows"]) for c in calls] == [("train", 4, 7), ("a", 3, 6), ("b", 3, 4)]
        assert all(c["tokenized"] for c in calls)
        assert [c["is_train_dataset"] for c in calls] == [True, False, False]
        # the return value replaced each dataset
        assert set(compat.REFERENCE_COLUMNS) <= set(trainer.train_dataset.column_names)
        assert all(set(compat.REFERENCE_COLUMNS) <= set(d.column_names) for d in trainer.eval_dataset.values())
        calls.clear()
        trainer.evaluate(eval_dataset=Dataset.from_list(make_pairs(5, seed=14)))
        assert [(c["name"], c["batch_size"], c["rows"]) for c in calls] == [("eval", 3, 5)]
        calls.clear()
        trainer.evaluate(eval_dataset={"c": Dataset.from_list(make_pairs(2, seed=15))})
        assert [(c["name"], c["rows"]) for c in calls] == [("c", 2)]
        calls.clear()
        trainer.evaluate()  # the eval sets prepared in __init__ are not recomputed
        assert calls == []


def test_precompute_model_is_the_ref_model_or_the_policy_and_the_engine_slot_exists(tokenizer, tmp_path):
    common = dict(
        args=DPOConfig(**cpu_args(tmp_path, precompute_ref_log_probs=True)),
        train_dataset=Dataset.from_list(make_pairs(4, seed=11)),
        processing_class=tokenizer,
    )
    reference = build_tiny_llama(tokenizer, seed=2)
    with_ref = PrecomputeSpy(model=build_tiny_llama(tokenizer, seed=1), ref_model=reference, **common)
    without = PrecomputeSpy(model=build_tiny_llama(tokenizer, seed=1), **common)
    with contract("precompute_model"):
        for trainer in (with_ref, without):
            call = trainer.precompute_calls[0]
            assert call["has_engine_attribute"] and call["engine"] is None
        assert with_ref.precompute_calls[0]["ref_model"] is not None
        # full fine-tuning, no FSDP: no reference model is kept, so the reference is the policy before any step
        assert without.precompute_calls[0]["ref_model"] is None and without.ref_model is None
        # DeepSpeed cannot run here: check the engine's builder and that TRL's precompute still keeps it in the slot
        from trl.models import prepare_deepspeed

        assert list(inspect.signature(prepare_deepspeed).parameters)[:2] == ["model", "accelerator"]
        source = inspect.getsource(DPOTrainer._precompute_ref_logps)
        assert "self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)" in source


# -- dataset columns, checkpoints, model card ---------------------------------------------------------------------------


class RecordsCheckpointFolder(DPOTrainer):
    def _save_checkpoint(self, model, trial):
        self.__dict__.setdefault("folders", []).append(compat.checkpoint_folder(self, trial))
        super()._save_checkpoint(model, trial)


def test_save_checkpoint_writes_the_folder_computed_before_it(tokenizer, tmp_path):
    trainer = dpo_trainer(
        tokenizer, tmp_path, RecordsCheckpointFolder, max_steps=2, save_strategy="steps", save_steps=1
    )
    trainer.train()
    with contract("save_checkpoint"):
        assert trainer.folders == [str(tmp_path / "checkpoint-1"), str(tmp_path / "checkpoint-2")]
        for folder in trainer.folders:
            assert os.path.isfile(os.path.join(folder, "model.safetensors")), os.listdir(folder)
            assert os.path.isfile(os.path.join(folder, "trainer_state.json"))
        assert compat.get_last_checkpoint(str(tmp_path)) == trainer.folders[-1]
        # with hub_strategy="checkpoint" the push happens inside, after the folder is written
        source = inspect.getsource(Trainer._save_checkpoint)
        assert "_push_from_checkpoint(output_dir)" in source
        # trainer_state.json is the Trainer's last write, before the push and the deletion of old checkpoints (the
        # reference file goes right after it, through the state's save_to_json)
        order = [
            "self.save_model(",
            "_save_optimizer_and_scheduler(",
            "self.state.save_to_json(",
            "_push_from_checkpoint(",
            "rotate_checkpoints(",
        ]
        positions = [source.index(call) for call in order]
        assert positions == sorted(positions), dict(zip(order, positions))
        assert source.count("save_to_json(") == 1


def test_prepare_dataset_keeps_extra_columns_and_drops_prompts_that_fill_max_length(tokenizer, tmp_path):
    rows = make_pairs(6, seed=3)
    rows[2] = {"prompt": " ".join(["red"] * 9), "chosen": " cat", "rejected": " dog"}  # one word is one token
    trainer = dpo_trainer(tokenizer, tmp_path, max_length=9)
    raw = Dataset.from_list(rows).add_column("row", list(range(6)))
    with contract("prepare_dataset"):
        prepared = trainer._prepare_dataset(raw, trainer.processing_class, trainer.args, "train")
        assert set(compat.TOKENIZED_COLUMNS) <= set(prepared.column_names) and "row" in prepared.column_names
        assert list(prepared["row"]) == [0, 1, 3, 4, 5]  # in order, the pair whose prompt fills max_length dropped
        unfiltered = copy.copy(trainer.args)
        unfiltered.max_length = None
        everything = trainer._prepare_dataset(raw, trainer.processing_class, unfiltered, "train")
        assert list(everything["row"]) == list(range(6))
        assert everything["prompt_ids"][3] == prepared["prompt_ids"][2]  # max_length does not touch the tokens


class CardTrainer(DPOTrainer):
    _tag_names, _name, _paper = compat.card_attributes(
        tags=["contract-tag"], name="Contract Method", paper={"title": "T", "id": "1234.56789", "citation": "@misc{c}"}
    )

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        self.__dict__.setdefault("card_calls", []).append({"model_name": model_name, **kwargs})


def test_model_card_tags_and_the_calls_that_write_it(tokenizer, tmp_path):
    with contract("model_card"):
        trainer = dpo_trainer(tokenizer, tmp_path, CardTrainer, max_steps=1, save_strategy="steps", save_steps=1)
        assert "contract-tag" in trainer.model.model_tags
        trainer.train()
        # one card per checkpoint, named after the output folder, through the (overridden) create_model_card
        assert trainer.card_calls == [{"model_name": tmp_path.name}]
        assert os.path.isdir(tmp_path / "checkpoint-1") and not (tmp_path / "README.md").exists()
        # push_to_hub cannot run offline here (tests/test_hub.py runs it up to the network): it hands its kwargs on
        assert "self.create_model_card(model_name=model_name, **kwargs)" in inspect.getsource(Trainer.push_to_hub)
        paper = compat.dpo_paper()
        assert paper["id"] == "2305.18290" and "Direct Preference Optimization" in paper["title"]
        assert paper["citation"].lstrip().startswith("@")


def test_trl_model_card_has_the_lines_the_card_extends(tokenizer, tmp_path):
    with contract("model_card_template"):
        trainer = dpo_trainer(tokenizer, tmp_path)  # DPOTrainer's own create_model_card, with a method's attributes
        trainer._tag_names, trainer._name, trainer._paper = CardTrainer._tag_names, "X", CardTrainer._paper
        trainer.create_model_card(model_name="tiny", dataset_name="org/pairs", tags=["t"])
        text = (tmp_path / "README.md").read_text(encoding="utf-8")
        assert len(compat.TRL_CARD_OPENING.findall(text)) == 1, text[:600]
        assert "[org/pairs](https://huggingface.co/datasets/org/pairs)" in compat.TRL_CARD_OPENING.search(text)[0]
        assert compat.TRL_CARD_QUICK_START_MODEL.format("None") in text  # no hub_model_id before a push
        assert text.count(compat.TRL_CARD_FRAMEWORK_VERSIONS) == 1 and text.count(compat.TRL_CARD_TRL_CITATION) == 1
        assert text.index(compat.TRL_CARD_FRAMEWORK_VERSIONS) < text.index(compat.TRL_CARD_TRL_CITATION)
        assert f"\n{compat.TRL_CARD_BOGUS_LICENSE_KEY}: license\n" in text
        assert {"t", "contract-tag"} <= set(ModelCard(text).data.tags)


def test_save_model_internal_call_does_not_push(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path)
    trainer.args.push_to_hub = True
    pushes = []
    trainer.push_to_hub = lambda *args, **kwargs: pushes.append(kwargs)
    with contract("save_without_push"):
        compat.save_model_without_push(trainer, str(tmp_path / "saved"))
        assert (tmp_path / "saved" / "model.safetensors").is_file() and pushes == []
        trainer.save_model(str(tmp_path / "pushed"))  # without the flag it pushes: the flag is what prevents it
        assert len(pushes) == 1


def test_push_to_hub_ignores_underscore_and_checkpoint_folders():
    with contract("push_ignore_patterns"):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        source = inspect.getsource(Trainer.push_to_hub)
        assert 'ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]' in source
        assert compat.PUSH_IGNORE_PATTERNS == ("_*", f"{PREFIX_CHECKPOINT_DIR}-*")


DDP_SCRIPT = """
import os, torch
from trl_cpo import _trl_compat
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
module = torch.nn.Linear(2, 2)
module.register_buffer("mask", torch.ones(2, dtype=torch.bool))
_trl_compat.ignore_in_ddp(module, ["mask"])
print(sorted(torch.nn.parallel.DistributedDataParallel(module).parameters_to_ignore))
torch.distributed.destroy_process_group()
"""


def test_ddp_skips_the_buffers_named_on_the_module():
    env = {**subprocess_env(), "PORT": str(free_port())}
    with contract("ddp_ignored_buffers"):
        result = subprocess.run(
            [sys.executable, "-c", DDP_SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == "['mask']"


def test_get_config_model_id_is_the_name_or_path(tokenizer, tmp_path):
    model = build_tiny_llama(tokenizer)
    model.save_pretrained(tmp_path)
    with contract("get_config_model_id"):
        assert compat.get_config_model_id(AutoModelForCausalLM.from_pretrained(tmp_path).config) == str(tmp_path)
        model.config._name_or_path = "example-org/tiny"
        assert compat.get_config_model_id(model.config) == "example-org/tiny"


def test_disable_gradient_checkpointing_switches_it_off_inside_only(tokenizer):
    model = build_tiny_llama(tokenizer)
    model.gradient_checkpointing_enable()
    with contract("disable_gradient_checkpointing"):
        assert model.is_gradient_checkpointing
        with compat.disable_gradient_checkpointing(model, None):
            assert not model.is_gradient_checkpointing
        assert model.is_gradient_checkpointing


def test_prepare_inputs_keeps_every_key_on_the_device(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path)
    batch = {**first_batch(trainer), "reference_margin": torch.ones(PAIRS)}
    with contract("prepare_inputs"):
        prepared = compat.prepare_inputs(trainer, batch)
        assert set(prepared) == set(batch)
        assert all(v.device == trainer.accelerator.device for v in prepared.values())
        torch.testing.assert_close(prepared["reference_margin"], batch["reference_margin"])


class MetricsSeen(TrainerCallback):
    def __init__(self):
        self.metrics = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics.append(dict(metrics))


def test_evaluation_metrics_carry_their_prefix_in_the_runtime_key(tokenizer, tmp_path):
    trainer = dpo_trainer(tokenizer, tmp_path)
    seen = MetricsSeen()
    trainer.add_callback(seen)
    trainer.evaluate(eval_dataset=Dataset.from_list(make_pairs(3, seed=16)))
    trainer.evaluate(eval_dataset={"held": Dataset.from_list(make_pairs(3, seed=17))})
    with contract("eval_metric_prefix"):
        assert "eval_runtime" in seen.metrics[0] and "eval_held_runtime" in seen.metrics[1]
        assert [compat.metric_prefix(m) for m in seen.metrics] == ["eval", "eval_held"]


# -- the methods trl_cpo overrides, and the register itself -------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(compat.DPO_METHODS))
def test_dpo_trainer_has_the_methods_trl_cpo_overrides_or_calls(method):
    with contract(compat.METHOD_ASSUMPTIONS[method]):
        params = tuple(inspect.signature(getattr(DPOTrainer, method)).parameters)[1:]
        assert params[: len(compat.DPO_METHODS[method])] == compat.DPO_METHODS[method], params


def test_a_missing_method_fails_early_with_the_assumption_named():
    compat.check_dpo_trainer()  # the installed DPOTrainer passes

    class Renamed(DPOTrainer):
        _precompute_ref_logps = None

    with pytest.raises(RuntimeError, match=r"TRL contract broken: _precompute_ref_logps\(dataset, name, batch_size\)"):
        compat.check_dpo_trainer(Renamed)


def test_a_broken_assumption_names_itself_its_user_and_its_trl_source():
    with pytest.raises(AssertionError) as error:
        with contract("sigmoid_norm_lengths"):
            raise ValueError("counted differently")
    message = str(error.value)
    assert message.startswith("TRL contract broken: 'sigmoid_norm' divides")
    assert "relied on by trl_cpo._margin_trainer._ReferenceMarginTrainer.compute_loss" in message
    assert re.search(
        rf"from trl/trainer/dpo_trainer\.py:\d+ DPOTrainer\._compute_loss in trl {re.escape(trl.__version__)}", message
    )
    assert message.endswith("ValueError: counted differently")


def test_every_assumption_has_a_contract_test_and_a_line_in_the_docs():
    tested = set(re.findall(r'contract\("([a-z_]+)"\)', open(__file__, encoding="utf-8").read()))
    assert tested == set(compat.ASSUMPTIONS), set(compat.ASSUMPTIONS) ^ tested
    docs = (REPO / "docs" / "trl-compatibility.md").read_text(encoding="utf-8")
    missing = [key for key in compat.ASSUMPTIONS if f"`{key}`" not in docs]
    assert not missing, f"docs/trl-compatibility.md does not list {missing}"
    table = docs[docs.index("## The assumptions") :]
    rows = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(rows) == sorted(compat.ASSUMPTIONS), f"stale rows in the docs: {set(rows) - set(compat.ASSUMPTIONS)}"
    for version in compat.TESTED_TRL_VERSIONS:
        assert version in docs
        assert version in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for assumption in compat.ASSUMPTIONS.values():
        assert "not found" not in assumption.source(), assumption.key
        assert all(user.startswith("trl_cpo") for user in assumption.used_by), assumption.key
