"""`stop_on_nonfinite` (`trl_cpo.nonfinite`): no checkpoint holds a non-finite value, whatever went non-finite.

The loss and margin guard is tested in tests/test_reference_file.py; here: an update that overflows with finite
gradients (the weights are checked before each save), a non-finite gradient after the first step (checked before the
update), and fp16, whose gradient scaler handles its own overflows.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import cpu_args
from safetensors.torch import load_file

from trl_cpo import CPOConfig, CPOTrainer
from trl_cpo.nonfinite import NonFiniteGradientGuard
from trl_cpo.tiny import build_tiny_llama


def trainer_for(tokenizer, train_dataset, tmp_path, **overrides):
    args = CPOConfig(**cpu_args(tmp_path, **{"max_steps": 3, "save_strategy": "steps", "save_steps": 1, **overrides}))
    return CPOTrainer(build_tiny_llama(tokenizer), args=args, train_dataset=train_dataset, processing_class=tokenizer)


def saved_checkpoints(folder):
    return {
        int(path.name.split("-")[1]): load_file(str(path / "model.safetensors"))
        for path in sorted(folder.glob("checkpoint-*"))
    }


def test_an_update_that_overflows_is_never_saved(tokenizer, train_dataset, tmp_path):
    # Adam's first step moves each weight by about the learning rate: 1e39 is past float32's range.
    trainer = trainer_for(tokenizer, train_dataset, tmp_path, learning_rate=1e39)
    with pytest.raises(FloatingPointError, match="Not saving .*checkpoint-1.*weights hold NaN or inf") as info:
        trainer.train()
    assert "Checked: every parameter, before each save" in str(info.value)
    assert saved_checkpoints(tmp_path) == {}  # checkpoint-1 was not written at all
    assert not (tmp_path / "checkpoint-1").exists()
    assert any(not torch.isfinite(p).all() for p in trainer.model.parameters())  # the overflow was real


def test_the_guard_off_keeps_trls_behaviour(tokenizer, train_dataset, tmp_path):
    trainer = trainer_for(tokenizer, train_dataset, tmp_path, learning_rate=1e39, max_steps=1)
    trainer.args.stop_on_nonfinite = False
    trainer.train()
    weights = saved_checkpoints(tmp_path)[1]
    assert any(not torch.isfinite(w).all() for w in weights.values())


def _poison_after_first_step(trainer):
    def poison(param):
        if trainer.state.global_step >= 1:
            param.grad.fill_(float("nan"))

    trainer.model.get_parameter("model.layers.0.mlp.up_proj.weight").register_post_accumulate_grad_hook(poison)


def test_a_non_finite_gradient_stops_before_the_update(tokenizer, train_dataset, tmp_path):
    trainer = trainer_for(tokenizer, train_dataset, tmp_path)
    _poison_after_first_step(trainer)
    with pytest.raises(FloatingPointError, match="Non-finite gradient .* at training step 2") as info:
        trainer.train()
    # clip_grad_norm_'s NaN scale factor reaches every gradient: the first parameters are named
    assert "before this step's update" in str(info.value) and "Checked: every gradient" in str(info.value)
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = saved_checkpoints(tmp_path)
    assert sorted(saved) == [1] and all(torch.isfinite(w).all() for w in saved[1].values())


def test_fp16_leaves_overflowing_gradients_to_its_scaler():
    guard = NonFiniteGradientGuard(trainer=None)
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.full((2, 2), math.inf)
    # fp16: the scaler skips the step and lowers its scale; the guard does not interfere (no gather, no error)
    guard.on_pre_optimizer_step(SimpleNamespace(fp16=True), SimpleNamespace(global_step=0), None, model=model)
    guard._trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False)
    with pytest.raises(FloatingPointError, match="weight"):
        guard.on_pre_optimizer_step(SimpleNamespace(fp16=False), SimpleNamespace(global_step=0), None, model=model)


def test_each_set_of_an_eval_dict_keeps_its_own_metric_names(tokenizer, train_dataset, tmp_path):
    from datasets import Dataset
    from helpers import make_pairs

    evals = {"a": Dataset.from_list(make_pairs(6, seed=2)), "b": Dataset.from_list(make_pairs(5, seed=3))}
    args = CPOConfig(**cpu_args(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1))
    trainer = CPOTrainer(
        build_tiny_llama(tokenizer),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=evals,
        processing_class=tokenizer,
    )
    trainer.train()
    by_set = {name: next(r for r in trainer.state.log_history if f"eval_{name}_loss" in r) for name in evals}
    for name, record in by_set.items():
        for metric in ("u_fraction", "ref_misaligned_fraction", "cpo_margin", "rewards/accuracies"):
            assert f"eval_{name}_{metric}" in record, (name, metric, sorted(record))
        assert not any(key.startswith("eval_") and key.split("_")[1] not in evals for key in record if key != "epoch")
    assert by_set["a"]["eval_a_cpo_margin"] != by_set["b"]["eval_b_cpo_margin"]  # each set's own value
