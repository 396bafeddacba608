"""Reference computations for the audit and callback tests: log-probs straight from a model's logits, no TRL."""

import random

import torch

WORDS = "red blue green small big cat dog bird runs sleeps eats fast slow happy sad the a is very not".split()


def spaced_pairs(n: int = 12, seed: int = 0) -> list[dict[str, str]]:
    """Explicit-prompt pairs whose completions start with a space, as in TRL's examples (word-level tokenizer)."""
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 5))),
            "chosen": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
            "rejected": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
        }
        for _ in range(n)
    ]


@torch.no_grad()
def logp_by_hand(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Summed log-prob of `completion` (+ eos, which TRL appends) after `prompt`, and its token count."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    token_logps = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    return token_logps[len(prompt_ids) - 1 :].sum().item(), len(ids) - len(prompt_ids)


def pair_logps(model, tokenizer, rows, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of `rows`, summed or averaged per completion token."""
    out = []
    for key in ("chosen", "rejected"):
        values = []
        for row in rows:
            logp, length = logp_by_hand(model, tokenizer, row["prompt"], row[key])
            values.append(logp / length if length_normalized else logp)
        out.append(torch.tensor(values))
    return out[0], out[1]
