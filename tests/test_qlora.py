"""QLoRA on CPU: a tiny Llama loaded in 4-bit NF4 (bitsandbytes) from a saved folder, plus LoRA, trained with
CPOTrainer and ECPOCTrainer.

The reference of a PEFT run is the frozen quantized base (the policy with its adapter disabled): the test checks
that the precomputed reference log-probs equal the base model's log-probs computed here by hand, that every LoRA
adapter learned while the base did not (dequantized weights unchanged), and that the adapter saves alone, reloads with
`PeftModel.from_pretrained` and merges.

On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit layers for inference on an eval-mode no-grad forward, after which
they cannot be trained (docs/bitsandbytes-cpu-repack.md). The `cpu_repack` fixture forces that code path on, and off,
whatever this CPU supports, so both are tested on every machine.
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
from trl_cpo.quantization import _bnb_cpu_inference_layout, repacked_4bit_layers

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.nn.modules as bnb_modules  # noqa: E402
from bitsandbytes.functional import dequantize_4bit  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(params=[True, False], ids=["cpu-repack-on", "cpu-repack-off"])
def cpu_repack(request, monkeypatch):
    """Make 4-bit layers built from now on take bitsandbytes' CPU inference repack path (as on CPUs with AVX512-BF16),
    or not (as on older CPUs), whatever this CPU supports. `monkeypatch.undo()` restores the machine's own answer."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


def linear4bit_layers(model):
    return {
        name.replace(".base_layer", ""): m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }


def frozen_weights(model):
    """Dequantized 4-bit weights and every other (full-precision) parameter, by base-model name."""
    weights = {
        name: dequantize_4bit(m.weight.data, m.weight.quant_state) for name, m in linear4bit_layers(model).items()
    }
    for name, param in model.named_parameters():
        if not isinstance(param, bnb.nn.Params4bit) and "lora_" not in name:
            weights[name.replace(".base_layer", "")] = param.detach().clone()
    return weights


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
    model_dir, train_dataset, tmp_path, trainer_cls, config_cls, extra, cpu_repack, monkeypatch
):
    model = load_4bit(model_dir)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert all(m.support_avx512bf16_for_cpu is cpu_repack for m in linear4bit_layers(model).values())
    base_before = frozen_weights(model)
    blocksize = model.model.layers[0].self_attn.q_proj.weight.quant_state.blocksize

    args = config_cls(**cpu_args(tmp_path / "out", max_steps=4, learning_rate=1e-2, disable_tqdm=True, **extra))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trainer_cls(model, args=args, train_dataset=train_dataset, peft_config=lora)
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    trainer.train()  # the first-step gradient check passes: every LoRA weight got a finite gradient
    policy = trainer.model
    assert isinstance(policy, PeftModel)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(key in logs[0] for key in ("u_fraction", "ref_misaligned_fraction"))
    # The reference precompute and training left every 4-bit layer in the layout that trains.
    assert repacked_4bit_layers(policy) == []

    # Every adapter learned: each lora_B starts at zero, so a nonzero one was updated; all-linear covers every layer.
    lora_b = {name: p for name, p in policy.named_parameters() if "lora_B" in name}
    assert len(lora_b) == 2 * 7, sorted(lora_b)  # 2 layers x (q, k, v, o, gate, up, down)
    assert [name for name, p in lora_b.items() if not p.detach().abs().sum() > 0] == []

    # The base did not learn: dequantized 4-bit weights equal before and after to the format's precision (a level
    # change of NF4 moves a weight by at least 0.079 of its block's absmax; the bound allows one bf16 rounding of the
    # absmax), and embeddings, norms and head are unchanged.
    base_after = frozen_weights(policy.get_base_model())
    assert base_after.keys() == base_before.keys()
    for key, before in base_before.items():
        after = base_after[key]
        if key in linear4bit_layers(model):
            block_absmax = before.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
            error = (after - before).reshape(-1, blocksize).abs()
            assert (error <= block_absmax * 2**-8).all(), key
        else:
            assert torch.equal(after, before), key

    # From here on, new 4-bit models take this machine's own path (a forced repack needs AVX512-BF16 to compute).
    monkeypatch.undo()

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
    # The 4-bit merge starts from a fresh load: `reloaded` ran in eval mode above, so on a CPU with AVX512-BF16
    # bitsandbytes repacked its layers, which PEFT's merge then dequantizes as if they were not (a wrong merge; see
    # docs/bitsandbytes-cpu-repack.md).
    merged_4bit = PeftModel.from_pretrained(load_4bit(model_dir), str(out)).merge_and_unload()
    assert not any("lora_" in name for name, _ in merged_4bit.named_parameters())
    torch.testing.assert_close(batch_logits(merged_4bit, rows), trained_logits, rtol=0, atol=0.2)


def quantized_layer():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    return layer.to("cpu")  # quantizes


def test_bitsandbytes_repack_contract(monkeypatch):
    """The bitsandbytes behaviour `trl_cpo.quantization._bnb_cpu_inference_layout` relies on. A failure here means the
    installed bitsandbytes changed it: update that function and docs/bitsandbytes-cpu-repack.md."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    x = torch.randn(3, 64)
    layer = quantized_layer()
    assert getattr(layer, "support_avx512bf16_for_cpu", None) is True, (
        "bitsandbytes' Linear4bit no longer sets `support_avx512bf16_for_cpu` from "
        "bitsandbytes.nn.modules.has_avx512bf16() in __init__"
    )
    layer.train()
    with torch.no_grad():
        layer(x)
    assert not _bnb_cpu_inference_layout(layer), "bitsandbytes now repacks 4-bit layers in train mode too"
    layer.eval()
    layer(x.requires_grad_())
    assert not _bnb_cpu_inference_layout(layer), "bitsandbytes now repacks 4-bit layers on inputs that need grad"
    with torch.no_grad():
        layer(x.detach())
    assert _bnb_cpu_inference_layout(layer), (
        "an eval-mode no-grad forward no longer sets QuantState.packing_format_for_cpu: bitsandbytes changed how it "
        "repacks 4-bit layers for CPU inference"
    )

    layer = quantized_layer()
    assert not _bnb_cpu_inference_layout(layer, switch_off=True)
    layer.eval()
    with torch.no_grad():
        layer(x.detach())
    assert not _bnb_cpu_inference_layout(layer), (
        "setting Linear4bit.support_avx512bf16_for_cpu = False no longer keeps bitsandbytes from repacking"
    )


def test_model_repacked_before_the_trainer_is_refused(model_dir, train_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = load_4bit(model_dir).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))  # e.g. a sanity-check generation before training
    assert len(repacked_4bit_layers(model)) == 14
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(
        ValueError, match=r"14 bitsandbytes 4-bit layers .*model\.layers\.0\.self_attn\.q_proj.*model\.train\(\)"
    ):
        CPOTrainer(model, args=CPOConfig(**cpu_args(tmp_path)), train_dataset=train_dataset, peft_config=lora)


def test_first_step_check_stops_a_run_whose_adapters_get_no_gradient(model_dir, train_dataset, tmp_path, monkeypatch):
    """Without the repack switch-off, the precompute repacks the base; the first step must stop the run, not train."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr("trl_cpo._margin_trainer.keep_4bit_layers_trainable", lambda model: None)
    monkeypatch.setattr("trl_cpo.precompute.keep_4bit_layers_trainable", lambda model: None)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = CPOTrainer(
        load_4bit(model_dir), args=CPOConfig(**cpu_args(tmp_path)), train_dataset=train_dataset, peft_config=lora
    )
    trainer.precompute_reference()  # what train() runs first
    assert len(repacked_4bit_layers(trainer.model)) == 14  # what bitsandbytes did during the precompute
    lora_before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match=r"14 bitsandbytes 4-bit layers are in bitsandbytes' CPU inference layout"):
        trainer.train()
    assert trainer.state.global_step == 0
    # Stopped before the optimizer step: the adapter is untouched.
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), lora_before[name]), name
