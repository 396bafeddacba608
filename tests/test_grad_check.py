"""The first-step gradient check (`trl_cpo._grad_check`): a run that would not train its parameters stops at the first
optimizer step, before the step, with an error naming the parameters."""

import pytest
import torch
from helpers import cpu_args

from trl_cpo import CPOConfig, CPOTrainer


def _trainer(model, tokenizer, train_dataset, tmp_path, **overrides):
    args = CPOConfig(**cpu_args(tmp_path, **overrides))
    return CPOTrainer(model, args=args, train_dataset=train_dataset, processing_class=tokenizer)


def _assert_not_stepped(trainer, before):
    assert trainer.state.global_step == 0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_parameters_without_gradient_stop_the_run(model, tokenizer, train_dataset, tmp_path):
    # Trainable parameters that take no part in the loss, like an unused head or tower.
    model.register_parameter("unused_head", torch.nn.Parameter(torch.zeros(4)))
    model.model.register_parameter("unused_tower", torch.nn.Parameter(torch.zeros(4)))
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    total = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(
        RuntimeError,
        match=rf"2 of {total} trainable parameters got no gradient: unused_head, model\."
        r"unused_tower\. .*requires_grad_\(False\)",
    ):
        trainer.train()
    _assert_not_stepped(trainer, before)


def _poison(param):
    param.grad.fill_(float("nan"))


def test_non_finite_gradients_stop_the_run(model, tokenizer, train_dataset, tmp_path):
    model.get_parameter("model.layers.1.mlp.up_proj.weight").register_post_accumulate_grad_hook(_poison)
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    # The Trainer computes the gradient norm with clip_grad_norm_ (max_norm inf when not clipping), whose NaN scale
    # factor reaches every gradient: all parameters are reported.
    total = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(
        RuntimeError, match=rf"{total} trainable parameters got a NaN or inf gradient: model\.embed_tokens"
    ):
        trainer.train()
    _assert_not_stepped(trainer, before)


def test_many_names_are_summarised(model, tokenizer, train_dataset, tmp_path):
    for i in range(7):
        model.register_parameter(f"unused_{i}", torch.nn.Parameter(torch.zeros(1)))
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    with pytest.raises(RuntimeError, match=r"unused_0, unused_1, unused_2, unused_3, unused_4 and 2 more\."):
        trainer.train()


def test_a_healthy_run_passes_and_is_checked_again_on_each_train_call(model, tokenizer, train_dataset, tmp_path):
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 3
    # A later train() call (e.g. a resume) is checked again on its first step.
    model.register_parameter("unused_head", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(RuntimeError, match="unused_head"):
        trainer.train()
