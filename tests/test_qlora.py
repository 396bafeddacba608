"""QLoRA on CPU: a tiny Llama loaded in 4-bit NF4 (bitsandbytes) from a saved folder, plus LoRA, trained with
CPOTrainer and ECPOCTrainer.

The reference of a PEFT run is the frozen quantized base (the policy with its adapter disabled): the test checks
that the precomputed reference log-probs equal the base model's log-probs computed here by hand, that the base
weights are bit-identical after training, and that the adapter saves alone, reloads with `PeftModel.from_pretrained`
and merges.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import cpu_args
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer

pytest.importorskip("bitsandbytes")

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_4bit(model_dir):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=BitsAndBytesConfig(**NF4), dtype=torch.float32
    )


def sequence_logps(model, rows, completion_key):
    """Summed log-prob of each row's completion given its prompt, from plain logits (no TRL code involved)."""
    out = []
    for row in rows:
        prompt, completion = row["prompt_ids"], row[completion_key]
        input_ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        targets = input_ids[0, 1:]
        token_logps = log_probs.gather(1, targets[:, None])[:, 0]
        out.append(token_logps[len(prompt) - 1 :].sum())
    return torch.stack(out)


def batch_logits(model, rows):
    input_ids = torch.tensor([rows[0]["prompt_ids"] + rows[0]["chosen_ids"]])
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.mark.parametrize(
    "trainer_cls, config_cls, extra",
    [
        (CPOTrainer, CPOConfig, {"cpo_gamma": 0.05}),
        (ECPOCTrainer, ECPOCConfig, {"ecpoc_gamma": 0.5, "ecpoc_tau": 2.0}),
    ],
    ids=["cpo", "ecpoc"],
)
def test_qlora_trains_against_frozen_quantized_base(
    model_dir, train_dataset, tmp_path, trainer_cls, config_cls, extra
):
    model = load_4bit(model_dir)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    base_before = {k: v.clone() for k, v in model.state_dict().items()}

    args = config_cls(**cpu_args(tmp_path / "out", max_steps=4, learning_rate=1e-2, disable_tqdm=True, **extra))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trainer_cls(model, args=args, train_dataset=train_dataset, peft_config=lora)
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    trainer.train()
    policy = trainer.model
    assert isinstance(policy, PeftModel)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(key in logs[0] for key in ("u_fraction", "ref_misaligned_fraction"))

    # Base weights (packed 4-bit data, quantization statistics, embeddings, norms) did not change.
    base_after = {
        k.replace(".base_layer", ""): v for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k
    }
    assert base_after.keys() == base_before.keys()
    for key, value in base_before.items():
        assert torch.equal(base_after[key].cpu(), value.cpu()), key

    # The precomputed reference is the frozen quantized base: the policy with its adapter disabled, after training.
    rows = trainer.train_dataset
    reference = trainer.train_reference_logps
    policy.eval()
    with policy.disable_adapter():
        base_chosen = sequence_logps(policy, rows, "chosen_ids")
        base_rejected = sequence_logps(policy, rows, "rejected_ids")
    torch.testing.assert_close(reference.chosen, base_chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference.rejected, base_rejected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(rows["ref_chosen_logps"]), base_chosen, rtol=1e-4, atol=1e-4)
    # ... and the trained adapter does change the policy.
    assert (sequence_logps(policy, rows, "chosen_ids") - base_chosen).abs().max() > 1e-2

    # The adapter saves alone (no base weights) ...
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in key for key in saved)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == model_dir

    # ... reloads on a fresh 4-bit base and gives the trained policy's outputs ...
    trained_logits = batch_logits(policy, rows)
    reloaded = PeftModel.from_pretrained(load_4bit(model_dir), str(out)).eval()
    # The trainer keeps QLoRA adapters in bf16; the reload upcasts them to fp32, hence the tolerance.
    torch.testing.assert_close(batch_logits(reloaded, rows), trained_logits, rtol=0, atol=2e-2)

    # ... and merges: into a full-precision copy of the base (the usual QLoRA export) exactly, and into the 4-bit
    # base up to requantization error.
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(out))
    unmerged_logits = batch_logits(full.eval(), rows)
    merged = full.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(batch_logits(merged, rows), unmerged_logits, rtol=0, atol=1e-4)
    base_logits = batch_logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), rows)
    assert (batch_logits(merged, rows) - base_logits).abs().max() > 1e-2
    merged_4bit = reloaded.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged_4bit.named_parameters())
    torch.testing.assert_close(batch_logits(merged_4bit, rows), trained_logits, rtol=0, atol=0.2)
