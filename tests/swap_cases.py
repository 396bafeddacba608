"""Building blocks of `test_swap_matrix.py`: tiny local models, data in each format TRL accepts, the `Case` each
feature of the matrix builds, and the per-feature checks.

Everything is built here, offline: one word-level tokenizer with a minimal chat template (roles, tools and tool calls,
a harmony-style `thinking` channel and `reasoning_effort`, and a `lead` keyword for `chat_template_kwargs`), a tiny
Llama, a tiny Qwen3-MoE and a tiny LLaVA (CLIP vision tower + Llama) with its processor. Models are saved to folders
and passed as paths: with full fine-tuning and no `ref_model`, DPOTrainer's live reference is re-loaded from the
model's path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from datasets import Dataset
from helpers import WORDS, make_pairs
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

#: Words of the chat template and of the tool / harmony rows, added to the tokenizer's vocabulary.
CHAT_WORDS = "user assistant system developer tool tools call think final reasoning low get_weather city :".split()
#: Renders every message format the cases use; every token is space-separated (the tokenizer splits on whitespace), so
#: the prompt rendered with the generation prompt is a token prefix of prompt + completion, as TRL expects.
CHAT_TEMPLATE = (
    "{%- if reasoning_effort %}{{ ' system : reasoning ' + reasoning_effort }}{% endif -%}"
    "{%- if tools %}{{ ' system : tools' }}{% for t in tools %}{{ ' ' + t['function']['name'] }}{% endfor %}{% endif -%}"
    "{%- if lead %}{{ ' ' + lead }}{% endif -%}"
    "{%- for m in messages -%}{{ ' ' + m['role'] + ' :' }}"
    "{%- if m['thinking'] %}{{ ' think ' + m['thinking'] + ' final' }}{% endif -%}"
    "{%- if m['content'] is string and m['content'] %}{{ ' ' + m['content'] }}"
    "{%- elif m['content'] %}{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ ' <image>' }}"
    "{%- else %}{{ ' ' + p['text'] }}{% endif %}{% endfor %}{% endif -%}"
    "{%- for c in m['tool_calls'] or [] %}{{ ' call ' + c['function']['name'] }}"
    "{%- for k, v in c['function']['arguments'].items() %}{{ ' ' + k + ' ' + v }}{% endfor %}{% endfor -%}"
    "{%- if m['role'] == 'assistant' %}{{ ' </s>' }}{% endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ ' assistant :' }}{% endif -%}"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def build_chat_tokenizer():
    tokenizer = build_tiny_tokenizer(WORDS + CHAT_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass
class Env:
    """The tokenizer and the saved tiny models, built once per session, each when first used."""

    root: Path
    tokenizer: object = field(default_factory=build_chat_tokenizer)

    def _save(self, name: str, model, processor=None) -> str:
        path = self.root / name
        model.save_pretrained(path)
        (processor or self.tokenizer).save_pretrained(path)
        return str(path)

    @cached_property
    def llama(self) -> str:
        return self._save("llama", build_tiny_llama(self.tokenizer))

    @cached_property
    def moe(self) -> str:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        tok = self.tokenizer
        config = Qwen3MoeConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            router_aux_loss_coef=0.01, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        return self._save("moe", Qwen3MoeForCausalLM(config))

    @cached_property
    def vlm(self) -> tuple[str, object]:
        """A tiny LLaVA (the layout of TRL's tiny-LlavaForConditionalGeneration: CLIP tower, Llama text model,
        `vision_feature_layer=-2`) and its processor, built from configs: 16x16 images in 8x8 patches, 4 image tokens."""
        from transformers import (
            CLIPImageProcessorPil,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tok = self.tokenizer
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
        )  # fmt: skip
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
            patch_size=8, projection_dim=32,
        )  # fmt: skip
        text = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default", vision_feature_layer=-2,
        )  # fmt: skip
        torch.manual_seed(0)
        return self._save("llava", LlavaForConditionalGeneration(config), processor), processor

    def ids(self, *words: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(list(words))


# -- data --------------------------------------------------------------------------------------------------------


def standard(n: int = 4, seed: int = 0) -> list[dict]:
    return make_pairs(n, seed)


def conversational(n: int = 4, seed: int = 0) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
        }
        for row in make_pairs(n, seed)
    ]


def implicit(rows: list[dict]) -> list[dict]:
    """The same pairs with the prompt inside both completions (TRL extracts the shared beginning)."""
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]


def tool_calling(n: int = 4) -> list[dict]:
    """A `tools` column (JSON text, as TRL accepts it) and a chosen completion that calls the tool."""
    rows = []
    for row in conversational(n):
        call = {
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": row["chosen"][0]["content"]}},
        }
        row["chosen"] = [{"role": "assistant", "content": "", "tool_calls": [call]}]
        rows.append({**row, "tools": json.dumps([WEATHER_TOOL])})
    return rows


def harmony(n: int = 4) -> list[dict]:
    """Harmony-shaped rows (TRL's trl-internal-testing/harmony 'preference' layout): a developer message, an analysis
    (`thinking`) channel before the final answer, and `reasoning_effort` through `chat_template_kwargs`. TRL renders
    them with the GPT-OSS tokenizer's template, which cannot be downloaded here: the minimal template renders the same
    fields, on the tiny Llama."""
    rows = []
    for row in conversational(n):
        row["prompt"].insert(0, {"role": "developer", "content": "very happy"})
        for key, thought in (("chosen", "small cat"), ("rejected", "big dog")):
            row[key][0]["thinking"] = thought
        rows.append({**row, "chat_template_kwargs": {"reasoning_effort": "low"}})
    return rows


def with_images(rows: list[dict]) -> list[dict]:
    from PIL import Image

    return [
        {
            "images": [Image.new("RGB", (16, 16), (60 * i, 90, 150))],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"].strip()}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"].strip()}]}],
        }
        for i, r in enumerate(rows)
    ]


# -- cases ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One feature: trainer keyword arguments (`model` included), DPO config fields, and what to expect."""

    kwargs: dict
    fields: dict = field(default_factory=dict)
    #: Extra checks on a trainer that trained: check(trainer, log_history).
    check: Callable | None = None
    #: A regex the ValueError must match (the trainers refuse the setting); None when the feature trains.
    refuses: str | None = None
    #: (type, message regex) of the error DPOTrainer itself raises here (a feature this CPU cannot run): the trainers
    #: must raise the same one.
    dpo_error: tuple[type[BaseException], str] | None = None
    #: Called with the trainer before training (e.g. an `evaluate()`; its metrics go to the log history).
    before: Callable | None = None
    #: Log keys compared with DPOTrainer's besides each step's loss and grad_norm (eval losses, aux_loss).
    compared: tuple[str, ...] = ()


def case(env: Env, fields: dict | None = None, *, rows: list[dict] | None = None, **kwargs) -> Case:
    """A `Case` training the tiny Llama (by path) on `rows` (default: 4 standard pairs); `kwargs` go to `Case` if
    they are its fields, else to the trainer."""
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in Case.__dataclass_fields__}
    trainer_kwargs = {"model": env.llama, "processing_class": env.tokenizer, **kwargs}
    trainer_kwargs.setdefault("train_dataset", Dataset.from_list(standard() if rows is None else rows))
    return Case(trainer_kwargs, fields or {}, **options)


def vlm_case(env: Env, rows: list[dict], fields: dict | None = None, **kwargs) -> Case:
    model, processor = env.vlm
    return case(env, fields, rows=rows, model=model, processing_class=processor, **kwargs)


def peft_model(env: Env, trained: bool):
    model = AutoModelForCausalLM.from_pretrained(env.llama)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if trained:  # an adapter that already moved away from the base model, as a re-trained one has
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    return model


def first_tokens(env: Env, *expected: tuple[str, int, str]) -> Callable:
    """Check that (column, row, space-separated words) start each given tokenized row."""

    def check(trainer, _):
        for column, row, words in expected:
            ids = env.ids(*words.split())
            assert trainer.train_dataset[row][column][: len(ids)] == ids, (column, row, words)

    return check


def collated_width(limit: int) -> Callable:
    def check(trainer, _):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert batch["input_ids"].shape[1] == limit  # the longest pairs were cut to max_length

    return check


def logged(*keys: str) -> Callable:
    def check(_, history):
        for key in keys:
            values = [entry[key] for entry in history if key in entry]
            assert values and all(torch.isfinite(torch.tensor(v)) for v in values), key

    return check


def refused(field_text: str, fix: str) -> str:
    return re.escape(field_text) + r" .*is not supported by \w.*" + re.escape(fix)


def vlm_check(trainer, _):
    assert trainer._is_vision_dataset and trainer.args.precompute_ref_log_probs is False


def sync_check(env: Env):
    def check(trainer, _):
        from safetensors.torch import load_file

        start = load_file(f"{env.llama}/model.safetensors")["model.embed_tokens.weight"]
        assert not torch.equal(trainer.ref_model.model.embed_tokens.weight.detach(), start)  # the reference moved

    return check


def peft_check(env: Env, existing: bool | None):
    """A new adapter (None) has no "ref" copy; a PeftModel passed in trains its "default" adapter against a frozen
    "ref" copy of it (TRL's re-training of an existing adapter), which must still hold the adapter's initial weights."""

    def check(trainer, _):
        assert ("ref" in trainer.model.peft_config) is (existing is not None)
        if existing is None:
            return
        initial = dict(peft_model(env, trained=existing).named_parameters())
        for name, param in trainer.model.named_parameters():
            if ".ref." in name:
                assert torch.equal(param, initial[name.replace(".ref.", ".default.")]), name
            elif "lora_B.default" in name:
                assert not torch.equal(param, initial[name]), name

    return check


def ds(n: int, seed: int) -> Dataset:
    return Dataset.from_list(standard(n, seed))
