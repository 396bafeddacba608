import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

from datasets import Dataset  # noqa: E402

from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer  # noqa: E402

WORDS = "red blue green small big cat dog bird runs sleeps eats fast slow happy sad the a is very not".split()


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic explicit-prompt preference pairs with completions of varied length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 6)))
        # completions start with a space so prompt + completion tokenizes as prompt tokens + completion tokens
        chosen = " " + " ".join(rng.choices(WORDS[:10], k=rng.randint(2, 7)))
        rejected = " " + " ".join(rng.choices(WORDS[10:], k=rng.randint(2, 7)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(WORDS)


@pytest.fixture
def model(tokenizer):
    return build_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def train_dataset():
    return Dataset.from_list(make_pairs(16, seed=0))


@pytest.fixture
def eval_dataset():
    return Dataset.from_list(make_pairs(8, seed=1))
