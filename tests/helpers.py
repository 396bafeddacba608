"""Shared test helpers: CPU configs, by-hand log-probs, scripts and subprocesses."""

import importlib.util
import os
import sys
from pathlib import Path

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference


def cpu_args(output_dir, **overrides):
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


@torch.no_grad()
def sequence_logps(model, tokenizer, rows, max_length=1024):
    """Per-pair summed completion log-probs and lengths, from plain logits (independent of TRL's fused head)."""
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    examples = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        chosen = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"][len(prompt) :]
        rejected = tokenizer(row["prompt"] + row["rejected"] + tokenizer.eos_token)["input_ids"][len(prompt) :]
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    batch = collator(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * mask).sum(dim=1)
    lengths = batch["completion_mask"].sum(dim=1).float()
    return logps.chunk(2), lengths.chunk(2)


REPO = Path(__file__).resolve().parent.parent


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
    return env
