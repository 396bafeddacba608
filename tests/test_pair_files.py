"""Per-pair evidence (issue 19, item 2): the files training writes (`pair_diagnostics`), joined back to the dataset by
row; the audit's `pairs.jsonl` with the same columns; the model card's summary of the final diagnostics."""

import json
import os

import pytest
import torch
from datasets import Dataset
from helpers import WORDS, cpu_args, logp_by_hand, spaced_pairs

from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.diagnostics import PAIR_COLUMNS, PAIRS_DIR, read_pairs
from trl_cpo.losses import cpo_margin
from trl_cpo.scripts import audit
from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

MAX_LENGTH = 9


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(WORDS)


def rows_with_long_prompts(n=14):
    """Pairs, three of them with a prompt that fills max_length (TRL drops those): the file must skip their rows."""
    rows = spaced_pairs(n, seed=5)
    for i in (i for i in (2, 7, 11) if i < n):
        rows[i]["prompt"] = " ".join(["the"] * (MAX_LENGTH + 1))
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("run")
    rows, eval_rows = rows_with_long_prompts(), spaced_pairs(5, seed=6)
    reference = build_tiny_llama(tok, seed=2)
    args = cpu_args(out, max_steps=2, per_device_train_batch_size=4, beta=1.0, max_length=MAX_LENGTH)
    trainer = CPOTrainer(
        model=build_tiny_llama(tok, seed=1),
        ref_model=reference,
        args=CPOConfig(**args, eval_strategy="steps", eval_steps=1, pair_diagnostics="eval"),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tok,
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    return {"out": out, "rows": rows, "eval_rows": eval_rows, "trainer": trainer, "reference": reference}


def test_the_file_joins_back_to_the_dataset(run, tok):
    rows, trainer = run["rows"], run["trainer"]
    pairs = read_pairs(str(run["out"] / PAIRS_DIR / "train.jsonl"))
    assert [list(pair) for pair in pairs] == [list(PAIR_COLUMNS)] * len(pairs)
    # Keyed by the row of the dataset given to the trainer: the three dropped pairs are missing, the rest in order.
    assert [pair["row"] for pair in pairs] == [i for i in range(len(rows)) if i not in (2, 7, 11)]
    policy, reference = trainer.model.eval(), run["reference"].eval()
    checked = 0
    for pair in pairs:
        row = rows[pair["row"]]  # the join
        prompt_tokens = len(tok(row["prompt"])["input_ids"])
        by_hand = {key: logp_by_hand(reference, tok, row["prompt"], row[key]) for key in ("chosen", "rejected")}
        if prompt_tokens + max(tokens for _, tokens in by_hand.values()) > MAX_LENGTH:
            continue  # truncated by the collator: by hand would score the whole completion
        checked += 1
        for key, (logp, tokens) in by_hand.items():
            assert pair[f"{key}_tokens"] == tokens
            assert pair[f"{key}_logp"] == pytest.approx(logp, abs=1e-4)
            policy_logp, _ = logp_by_hand(policy, tok, row["prompt"], row[key])
            assert pair[f"policy_{key}_logp"] == pytest.approx(policy_logp, abs=1e-4)
        # The loss's space (per token), the method's target, and the flags from them.
        n_w, n_l = pair["chosen_tokens"], pair["rejected_tokens"]
        delta_ref = pair["chosen_logp"] / n_w - pair["rejected_logp"] / n_l
        delta_pi = pair["policy_chosen_logp"] / n_w - pair["policy_rejected_logp"] / n_l
        margin = cpo_margin(
            torch.tensor([pair["chosen_logp"] / n_w]), torch.tensor([pair["rejected_logp"] / n_l]), gamma=0.05
        )
        assert pair["delta_ref"] == pytest.approx(delta_ref, abs=1e-5)
        assert pair["delta_pi"] == pytest.approx(delta_pi, abs=1e-5)
        assert pair["target"] == pytest.approx(delta_ref + margin.item(), abs=1e-5)  # beta = 1
        assert pair["misaligned"] == (delta_ref < 0)
        assert pair["in_u"] == (delta_ref + 1e-4 < delta_pi < 0)
        assert pair["weight"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(delta_pi - pair["target"]))).item())
    assert checked >= 4


def test_each_evaluation_writes_its_eval_split(run):
    folder = run["out"] / PAIRS_DIR
    assert sorted(os.listdir(folder)) == ["eval.jsonl", "step-1", "step-2", "train.jsonl"]
    for step in ("step-1", "step-2"):
        assert os.listdir(folder / step) == ["eval.jsonl"]
    # The last evaluation and the end of training see the same weights.
    assert read_pairs(str(folder / "step-2" / "eval.jsonl")) == read_pairs(str(folder / "eval.jsonl"))
    assert len(read_pairs(str(folder / "eval.jsonl"))) == len(run["eval_rows"])


def test_the_model_card_summarises_the_final_diagnostics(run):
    card = (run["out"] / "README.md").read_text()
    section = card.split("### Diagnostics at the end of training")[1]
    final = run["trainer"].diagnostics.final
    assert set(final) == {"train", "eval"}
    train_pairs = read_pairs(str(run["out"] / PAIRS_DIR / "train.jsonl"))
    assert final["train"]["ranking_accuracy"] == sum(p["delta_pi"] > 0 for p in train_pairs) / len(train_pairs)
    row = next(line for line in section.splitlines() if line.startswith("| `ranking_accuracy`"))
    assert f"{final['train']['ranking_accuracy']:.3g}" in row and "U" in section
    assert "last logged training step (step 2)" in section and "train set, final weights (11 pairs)" in section
    assert f"{PAIRS_DIR}/<split>.jsonl" in section


def test_the_audit_writes_the_same_columns(tmp_path, tok):
    data = tmp_path / "pairs.jsonl"
    rows = rows_with_long_prompts(10)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = tmp_path / "model"
    build_tiny_llama(tok, seed=2).save_pretrained(model)
    tok.save_pretrained(model)
    argv = ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", tmp_path / "audit", "--method"]
    argv += ["hypo", "--use_cpu", "true", "--bf16", "false", "--max_length", str(MAX_LENGTH)]
    assert audit.main([str(a) for a in argv]) == 0
    pairs = read_pairs(str(tmp_path / "audit" / "pairs.jsonl"))
    assert [pair["row"] for pair in pairs] == [i for i in range(len(rows)) if i not in (2, 7)]
    for pair in pairs:
        assert list(pair)[: len(PAIR_COLUMNS)] == list(PAIR_COLUMNS)
        assert list(pair)[len(PAIR_COLUMNS) :] == ["confident_misaligned", "cpo_target", "ecpoc_target"]
        assert pair["target"] == pytest.approx(max(pair["delta_ref"], 0.0))  # --method hypo
        assert pair["delta_ref"] == pair["delta_ref_per_token"]  # the default loss_type: sigmoid_norm
        assert all(pair[name] is None for name in PAIR_COLUMNS[PAIR_COLUMNS.index("policy_chosen_logp") :])
