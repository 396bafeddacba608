"""The first-step gradient check (`trl_cpo._grad_check`): a run that would not train its parameters stops at the first
optimizer step, before the step, with an error naming the parameters; some parameters without a gradient, while the
rest train (normal for a vision-language model), are named in a warning."""

import logging

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


def test_parameters_without_gradient_are_named_and_the_rest_trains(model, tokenizer, train_dataset, tmp_path, caplog):
    # Trainable parameters that take no part in the loss, like an unused head or tower.
    model.register_parameter("unused_head", torch.nn.Parameter(torch.zeros(4)))
    model.model.register_parameter("unused_tower", torch.nn.Parameter(torch.zeros(4)))
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    total = sum(p.requires_grad for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer.train()
    assert trainer.state.global_step == 3
    warnings = [r.getMessage() for r in caplog.records if "got no gradient" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"2 of {total} trainable parameters got no gradient on the first step")
    assert "unused_head, model.unused_tower. " in warnings[0] and "requires_grad_(False)" in warnings[0]


def _drop(param):
    param.grad = None


def test_no_parameter_with_a_gradient_stops_the_run(model, tokenizer, train_dataset, tmp_path):
    # What a repacked 4-bit model or a graph cut upstream of everything looks like: no gradient reaches anything.
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(_drop)
    total = sum(p.requires_grad for p in model.parameters())
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(
        RuntimeError, match=rf"{total} of {total} trainable parameters got no gradient: .*requires_grad_\(False\)"
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


def test_many_names_are_summarised(model, tokenizer, train_dataset, tmp_path, caplog):
    for i in range(7):
        model.register_parameter(f"unused_{i}", torch.nn.Parameter(torch.zeros(1)))
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    with caplog.at_level(logging.WARNING, logger="trl_cpo"):
        trainer.train()
    assert "unused_0, unused_1, unused_2, unused_3, unused_4 and 2 more." in caplog.text


def test_a_healthy_run_passes_and_is_checked_again_on_each_train_call(model, tokenizer, train_dataset, tmp_path):
    trainer = _trainer(model, tokenizer, train_dataset, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 3
    # A later train() call (e.g. a resume) is checked again on its first step.
    model.register_parameter("unused_grad", torch.nn.Parameter(torch.zeros(4)))
    model.get_parameter("model.layers.1.mlp.up_proj.weight").register_post_accumulate_grad_hook(_poison)
    with pytest.raises(RuntimeError, match="NaN or inf gradient"):
        trainer.train()
