import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

from datasets import Dataset  # noqa: E402
from helpers import WORDS, make_pairs  # noqa: E402

from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer  # noqa: E402


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
