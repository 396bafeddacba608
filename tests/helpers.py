"""Shared test helpers: CPU configs and by-hand log-probs."""

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
