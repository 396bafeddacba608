"""The synthetic preference task behind `trl-cpo demo`: data, the corrupted reference, and held-out log-probs.

The task is built so that a 2-layer model learns it in seconds and the quantities of the paper's argument are known:

- `num_topics` topics; a prompt is ``topic<k>`` followed by a few filler words. Each topic has its own *good* pool of
  words (``good<k>_<j>``) and *bad* pool (``bad<k>_<j>``); a response is 3-5 words drawn from one pool.
- A preference pair puts a good response against a bad one. Annotators are noisy: in training pairs the labels are
  swapped with probability `label_noise` (as in real preference data, where annotators agree only ~70-80% of the
  time). Held-out pairs carry the majority label: the good response is chosen.
- The reference is trained by SFT on the training prompts. On *corrupted* topics (a share `corruption` of the topics,
  hence of the pairs) it imitates the rejected (bad) response instead of the good one. Each word of an SFT target
  is swapped for its counterpart in the other pool with probability `ref_noise`, so the reference is confident but
  not certain: its per-word log-odds are about ``log(ref_noise / (1 - ref_noise))`` (-2.2 for 0.1).

With noisy labels each loss has a finite optimum (`trl_cpo.scripts.demo.optimum`); DPO's,
``delta_pi = delta_ref + logit(1 - label_noise) / beta`` on length-normalized log-probs, is anchored at the reference:
on corrupted topics it stays below 0, inside the undesirable space U. That is the paper's failure mode in a form a
laptop can train.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FILLER_WORDS = "please tell me about the thing you know now what how why".split()


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the synthetic task (see the module docstring)."""

    num_topics: int = 20
    pool_size: int = 3
    min_words: int = 3
    max_words: int = 5
    label_noise: float = 0.2
    ref_noise: float = 0.1

    def __post_init__(self):
        if self.num_topics < 1 or self.pool_size < 1:
            raise ValueError("num_topics and pool_size must be >= 1.")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError("Need 1 <= min_words <= max_words.")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise={self.label_noise} must be in [0, 0.5): it is the share of swapped labels.")
        if not 0 <= self.ref_noise < 0.5:
            raise ValueError(f"ref_noise={self.ref_noise} must be in [0, 0.5).")

    def vocabulary(self) -> list[str]:
        words = list(FILLER_WORDS)
        for k in range(self.num_topics):
            words.append(f"topic{k}")
            words += [f"{pool}{k}_{j}" for pool in ("good", "bad") for j in range(self.pool_size)]
        return words


def corrupted_topics(num_topics: int, ratio: float, seed: int) -> list[int]:
    """The topics whose reference imitates the rejected response: ``round(ratio * num_topics)`` of them.

    Drawn from one seed-fixed permutation, so the corrupted sets of a sweep are nested (0.2's topics are among 0.4's).
    """
    if not 0 <= ratio <= 1:
        raise ValueError(f"corruption ratio {ratio} must be in [0, 1].")
    order = list(range(num_topics))
    random.Random(f"corruption-{seed}").shuffle(order)
    return sorted(order[: round(ratio * num_topics)])


def _response(rng: random.Random, task: TaskConfig, pool: str, topic: int) -> str:
    length = rng.randint(task.min_words, task.max_words)
    return " ".join(f"{pool}{topic}_{rng.randrange(task.pool_size)}" for _ in range(length))


def make_pairs(task: TaskConfig, n: int, seed: int, *, label_noise: float) -> list[dict]:
    """`n` pairs, topics balanced (pair i has topic ``i % num_topics``); labels swapped with prob. `label_noise`.

    Each row: ``prompt``, ``chosen``, ``rejected`` (what a preference dataset holds), plus ``good`` / ``bad`` (the
    majority-preferred and dispreferred response), ``topic`` and ``swapped``.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = i % task.num_topics
        filler = " ".join(rng.choices(FILLER_WORDS, k=rng.randint(2, 4)))
        good, bad = _response(rng, task, "good", topic), _response(rng, task, "bad", topic)
        swapped = rng.random() < label_noise
        chosen, rejected = (bad, good) if swapped else (good, bad)
        # Completions start with a space so that prompt + completion splits into the same words.
        rows.append(
            {
                "prompt": f"topic{topic} {filler}",
                "chosen": " " + chosen,
                "rejected": " " + rejected,
                "good": " " + good,
                "bad": " " + bad,
                "topic": topic,
                "swapped": swapped,
            }
        )
    return rows


def _other_pool(word: str) -> str:
    """``good<k>_<j>`` <-> ``bad<k>_<j>``."""
    return "bad" + word[len("good") :] if word.startswith("good") else "good" + word[len("bad") :]


def reference_sft_examples(
    task: TaskConfig, pairs: Sequence[dict], corrupted: Sequence[int], seed: int
) -> list[tuple[str, str]]:
    """(prompt, target) SFT examples for the reference, one per training pair.

    The target is the pair's good response, or its bad (rejected-by-majority) response on a corrupted topic; each word
    is then swapped for its other-pool counterpart with probability `ref_noise`.
    """
    rng = random.Random(f"reference-{seed}")
    corrupted = set(corrupted)
    examples = []
    for pair in pairs:
        imitated = pair["bad"] if pair["topic"] in corrupted else pair["good"]
        words = []
        for word in imitated.split():
            words.append(_other_pool(word) if rng.random() < task.ref_noise else word)
        examples.append((pair["prompt"], " " + " ".join(words)))
    return examples


# -- tokenization and log-probs ---------------------------------------------------------------------------------------


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion followed by EOS, as TRL's DPOTrainer tokenizes them."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def collate(
    items: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` for (prompt_ids, completion_ids) items."""
    length = max(len(p) + len(c) for p, c in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    completion_mask = torch.zeros_like(attention_mask)
    for i, (prompt_ids, completion_ids) in enumerate(items):
        n = len(prompt_ids) + len(completion_ids)
        input_ids[i, :n] = torch.tensor(prompt_ids + completion_ids)
        attention_mask[i, :n] = 1
        completion_mask[i, len(prompt_ids) : n] = 1
    return input_ids, attention_mask, completion_mask


def _token_logps(model, input_ids, attention_mask, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return logps, completion_mask[:, 1:].float()


@torch.no_grad()
def completion_logps(
    model, items: Sequence[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (EOS included) and completion lengths, one entry per item."""
    was_training = model.training
    model.eval()
    sums, lengths = [], []
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start : start + batch_size], pad_token_id)
            logps, mask = _token_logps(model, *batch)
            sums.append((logps * mask).sum(dim=1))
            lengths.append(mask.sum(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(sums), torch.cat(lengths)


def train_sft(
    model,
    items: Sequence[tuple[list[int], list[int]]],
    *,
    pad_token_id: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Plain SFT (token-mean cross-entropy on completion tokens, AdamW, constant LR); returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    losses = []
    for step in range(steps):
        index = torch.randint(len(items), (batch_size,), generator=generator).tolist()
        logps, mask = _token_logps(model, *collate([items[i] for i in index], pad_token_id))
        loss = -(logps * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses
