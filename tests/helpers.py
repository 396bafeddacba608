"""Shared test helpers: synthetic pairs, CPU configs, log-probs by hand (no TRL), scripts and subprocesses.

`conftest.py` holds the fixtures built from these; test files import what they need from here.
"""

import importlib.util
import os
import random
import socket
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

#: The vocabulary of the synthetic pairs (and of the tiny word-level tokenizer the fixtures build on it).
WORDS = "red blue green small big cat dog bird runs sleeps eats fast slow happy sad the a is very not".split()


def make_pairs(
    n: int,
    seed: int = 0,
    *,
    prompt_words: tuple[int, int] = (3, 6),
    completion_words: tuple[int, int] = (2, 7),
    split_vocabulary: bool = True,
) -> list[dict[str, str]]:
    """Synthetic explicit-prompt preference pairs with completions of varied length.

    Completions start with a space, so prompt + completion tokenizes as prompt tokens + completion tokens (as in TRL's
    examples). With `split_vocabulary`, chosen completions use the first ten words and rejected ones the others.
    """
    rng = random.Random(seed)
    chosen_pool, rejected_pool = (WORDS[:10], WORDS[10:]) if split_vocabulary else (WORDS, WORDS)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(*prompt_words)))
        chosen = " " + " ".join(rng.choices(chosen_pool, k=rng.randint(*completion_words)))
        rejected = " " + " ".join(rng.choices(rejected_pool, k=rng.randint(*completion_words)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def spaced_pairs(n: int = 12, seed: int = 0) -> list[dict[str, str]]:
    """Pairs whose prompt and both completions draw from the whole vocabulary, with shorter texts."""
    return make_pairs(n, seed, prompt_words=(2, 5), completion_words=(1, 6), split_vocabulary=False)


#: Config fields that make a TrainingArguments-based config run on this CPU-only machine (no output_dir).
CPU = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


def cpu_args(output_dir, **overrides):
    """Keyword arguments of a tiny, fast, CPU training run writing to `output_dir` (no saving by default)."""
    args = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    args.update(overrides)
    return args


def unwritable_folder(tmp_path) -> str:
    """A folder path this process cannot create (root ignores permission bits: it cannot create folders in /proc)."""
    if os.geteuid() == 0:
        return "/proc/trl-cpo-test/run"
    locked = Path(tmp_path) / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "run")


def train_logs(trainer) -> list[dict]:
    """Train, and return the per-step training log entries (those with a loss, without the final summary)."""
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


# -- log-probs by hand: plain logits of one unpadded sequence, nothing from TRL -----------------------------------


@torch.no_grad()
def logp_by_hand(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Summed log-prob of `completion` (+ eos, which TRL appends) after `prompt`, and its token count."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    token_logps = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    return token_logps[len(prompt_ids) - 1 :].sum().item(), len(ids) - len(prompt_ids)


def sequence_logps(model, tokenizer, rows):
    """((chosen, rejected) summed completion log-probs, (chosen, rejected) completion lengths) of `rows`, by hand."""
    out = {}
    for key in ("chosen", "rejected"):
        pairs = [logp_by_hand(model, tokenizer, row["prompt"], row[key]) for row in rows]
        out[key] = torch.tensor([logp for logp, _ in pairs]), torch.tensor([float(n) for _, n in pairs])
    return (out["chosen"][0], out["rejected"][0]), (out["chosen"][1], out["rejected"][1])


def pair_logps(model, tokenizer, rows, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of `rows`, summed or averaged per completion token."""
    (chosen, rejected), (chosen_lengths, rejected_lengths) = sequence_logps(model, tokenizer, rows)
    if length_normalized:
        return chosen / chosen_lengths, rejected / rejected_lengths
    return chosen, rejected


def column_margins(trainer, split: str = "train") -> torch.Tensor:
    """The per-pair margins the loss step computes from a split's reference columns (`ref_chosen_logps`,
    `ref_rejected_logps`), with the completion lengths of the trainer's stored reference of that split. `split`:
    "train", or an eval set's name ("eval" for a single one)."""
    from trl_cpo.reference import ReferenceLogps

    trainer.precompute_reference()  # the columns are added when training or evaluation starts
    if split == "train":
        dataset, reference = trainer.train_dataset, trainer.train_reference_logps
    else:
        evals = trainer.eval_dataset
        dataset, reference = (evals[split] if isinstance(evals, dict) else evals), trainer.eval_reference_logps[split]
    columns = (torch.tensor(dataset["ref_chosen_logps"]), torch.tensor(dataset["ref_rejected_logps"]))
    return trainer.reference_margin(ReferenceLogps(*columns, reference.chosen_lengths, reference.rejected_lengths))


# -- scripts and subprocesses ----------------------------------------------------------------------------------------


def load_script(name: str, path: Path):
    """Import a script by path (registered in sys.modules first, as dataclasses need)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def subprocess_env() -> dict[str, str]:
    """Environment for launching the repo's scripts offline in a child process (torchrun, accelerate launch)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", WANDB_DISABLED="true", OMP_NUM_THREADS="1")
    # Each launch gets an empty reference store: a 2-process run must compute its reference, not read the entry a
    # 1-process run of the same test wrote (tests of the store share a folder on purpose, by setting it themselves).
    env["TRL_CPO_REFERENCE_CACHE"] = tempfile.mkdtemp(prefix="reference-store-")
    return env


def free_port() -> int:
    """A free local TCP port for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step_accuracy_is_roundoff(step: int, key: str, *logs: dict) -> bool:
    """True (after checking the rewards are ~0) for `rewards/accuracies` at the first logged training step.

    Before the first update the policy is the reference, so both rewards are 0 up to float round-off, and
    `chosen > rejected` compares round-off: the reference log-probs come from differently padded batches (the
    trainers' precompute batches pairs by length) than the policy's. Comparisons skip that one value.
    """
    if step != 0 or key != "rewards/accuracies":
        return False
    assert all(abs(log[k]) < 1e-5 for log in logs for k in ("rewards/chosen", "rewards/rejected")), logs
    return True
