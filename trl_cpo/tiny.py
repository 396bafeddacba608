"""Tiny models and tokenizers built locally, with no download: for tests, the demo, benchmarks and offline recipes.

The tokenizer is a word-level `tokenizers` model trained on the given texts; the models are randomly initialised
Llamas of any shape (a few layers of width 64 for tests, Llama-3-8B's shape for GPU benchmarks) or Qwen2s (a second
architecture for tests: attention biases, grouped-query attention and tied input/output embeddings, as in the small
Qwen2 checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a lower-cased word-level tokenizer on `texts` (words outside the top `vocab_size` map to `<unk>`)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    # Whitespace-split words: decoding joins them with spaces.
    fast.padding_side = "left"
    return fast


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
    **config_kwargs,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for `tokenizer`'s vocabulary (or `vocab_size`, if larger)."""
    config = LlamaConfig(
        **_shape(tokenizer, hidden_size, num_layers, num_heads, num_key_value_heads, intermediate_size, vocab_size),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **config_kwargs,
    )
    return _seeded(LlamaForCausalLM, config, seed)


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int | None = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    **config_kwargs,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 sized for `tokenizer`'s vocabulary: biased q/k/v projections, grouped-query
    attention (2 key-value heads for 4 query heads) and, by default, an LM head tied to the input embeddings."""
    config = Qwen2Config(
        **_shape(tokenizer, hidden_size, num_layers, num_heads, num_key_value_heads, intermediate_size, vocab_size),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    return _seeded(Qwen2ForCausalLM, config, seed)


def _shape(tokenizer, hidden_size, num_layers, num_heads, num_key_value_heads, intermediate_size, vocab_size) -> dict:
    return dict(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _seeded(model_cls, config, seed: int):
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_cls(config)
