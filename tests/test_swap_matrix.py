"""Swap matrix: each DPOTrainer feature TRL documents or tests, run through CPOTrainer and ECPOCTrainer, each with a
plain `trl.DPOConfig` and with the method's own config. FEATURES below lists them; `tests/swap_cases.py` builds the
tiny models, the data in each format and the checks, offline.

Each cell expects one outcome:

- "parity" (CPOTrainer, CPOConfig with `cpo_gamma=0` and DPOConfig's own `beta` / `loss_type`): the per-step loss and
  grad_norm (two steps, so the second loss also reflects the first update), plus the eval losses and MoE `aux_loss`
  where the feature has them, equal DPOTrainer's run of the same DPOConfig fields to round-off. DPOTrainer runs with
  its default live reference, CPOTrainer with its own default (precomputed for map-style text data, else live), so the
  cell also checks that the precompute leaves the loss unchanged.
- "trains" (ECPOCTrainer, and CPOTrainer given a plain DPOConfig, i.e. `cpo_gamma=0.05`): two steps with finite
  losses, `u_fraction` in [0, 1] and the method's margin / target metric logged and finite.
- "refuses": a ValueError naming the field and the fix, for a setting DPOConfig accepts.
- "dpo_error": a feature DPOTrainer itself cannot run on this CPU-only machine; the trainers raise the same error.
- "canary" (one cell): the parity comparison fails at `cpo_gamma=0.05`, so the parity cells can fail.

Every cell that trains also runs the feature's own check (e.g. the chat template's tokens in `prompt_ids`, eval
metrics logged). Cells that fail through a trl_cpo defect are xfail(strict=True) with the defect (DEFECTS).
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Callable

import pytest
import torch
from helpers import cpu_args
from peft import LoraConfig
from swap_cases import (
    Case,
    Env,
    case,
    collated_width,
    conversational,
    ds,
    first_tokens,
    harmony,
    implicit,
    logged,
    peft_check,
    peft_model,
    refused,
    standard,
    sync_check,
    tool_calling,
    vlm_case,
    vlm_check,
    with_images,
)
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.tiny import build_tiny_llama

METHODS = {"cpo": (CPOTrainer, CPOConfig, "cpo_margin"), "ecpoc": (ECPOCTrainer, ECPOCConfig, "ecpoc_target")}
#: DPOConfig's own values of the fields whose defaults the methods' configs change, for the parity cells.
DPO_DEFAULTS = {"beta": 0.1, "loss_type": ["sigmoid"]}
RTOL, ATOL = 1e-5, 1e-6
STEPS = 2

FEATURES: dict[str, Callable[[Env], Case]] = {
    "standard": lambda env: case(env),
    "ref_model": lambda env: case(env, ref_model=build_tiny_llama(env.tokenizer, seed=3)),
    "peft_config": lambda env: case(
        env,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        check=peft_check(env, None),
    ),
    "peft_model": lambda env: case(env, model=peft_model(env, trained=False), check=peft_check(env, False)),
    "peft_existing_adapter": lambda env: case(env, model=peft_model(env, trained=True), check=peft_check(env, True)),
    "gradient_checkpointing": lambda env: case(
        env, {"gradient_checkpointing": True}, check=lambda t, _: t.model.is_gradient_checkpointing
    ),
    "use_weighting": lambda env: case(env, {"use_weighting": True}),
    "sft_mix": lambda env: case(env, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "keep_start": lambda env: case(env, {"max_length": 7, "truncation_mode": "keep_start"}, check=collated_width(7)),
    "keep_end": lambda env: case(env, {"max_length": 7, "truncation_mode": "keep_end"}, check=collated_width(7)),
    # TRL 1.16 switches padding_free off with a warning on every device (it is planned to return).
    "padding_free": lambda env: case(env, {"padding_free": True}, check=lambda t, _: t.padding_free is False),
    "conversational": lambda env: case(
        env, rows=conversational(), check=first_tokens(env, ("prompt_ids", 0, "user :"), ("prompt_ids", 1, "user :"))
    ),
    "implicit_prompt": lambda env: case(env, rows=implicit(standard())),
    "conversational_implicit_prompt": lambda env: case(
        env, rows=implicit(conversational()), check=first_tokens(env, ("prompt_ids", 0, "user :"))
    ),
    "tool_calling": lambda env: case(
        env,
        rows=tool_calling(),
        check=first_tokens(
            env, ("prompt_ids", 0, "system : tools get_weather user"), ("chosen_ids", 0, "call get_weather city")
        ),
    ),
    "harmony": lambda env: case(
        env,
        rows=harmony(),
        check=first_tokens(
            env, ("prompt_ids", 0, "system : reasoning low developer"), ("chosen_ids", 0, "think small cat final")
        ),
    ),
    "chat_template_kwargs": lambda env: case(
        env,
        rows=[
            {**row, "chat_template_kwargs": {"lead": ("very", "not")[i % 2]}} for i, row in enumerate(conversational())
        ],
        check=first_tokens(env, ("prompt_ids", 0, "very user"), ("prompt_ids", 1, "not user")),
    ),
    "model_init_kwargs": lambda env: case(
        env,
        {"model_init_kwargs": {"dtype": "float32", "attn_implementation": "eager"}},
        check=lambda t, _: t.model.config._attn_implementation == "eager",
    ),
    "moe_aux_loss": lambda env: case(
        env, {"router_aux_loss_coef": 0.02}, model=env.moe, check=logged("aux_loss"), compared=("aux_loss",)
    ),
    "eval_dict": lambda env: case(
        env,
        {"eval_strategy": "steps", "eval_steps": 2},
        eval_dataset={"a": ds(4, 1), "b": ds(2, 2)},
        check=logged("eval_a_loss", "eval_b_loss"),
        compared=("eval_a_loss", "eval_b_loss"),
    ),
    "compute_metrics": lambda env: case(
        env,
        {"eval_strategy": "steps", "eval_steps": 2},
        eval_dataset=ds(4, 1),
        compute_metrics=lambda _: {"m": 0.123},
        check=lambda _, h: [e["eval_m"] for e in h if "eval_m" in e] == [0.123],
        compared=("eval_loss",),
    ),
    "precompute_ref_log_probs": lambda env: case(
        env, {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 3}
    ),
    # evaluate() on datasets passed to it (TRL's test_evaluate_with_eval_dataset), before training.
    "evaluate_dict": lambda env: case(
        env,
        before=lambda t: t.evaluate(eval_dataset={"a": ds(4, 1), "b": ds(2, 2)}),
        check=logged("eval_a_loss", "eval_b_loss"),
        compared=("eval_a_loss", "eval_b_loss"),
    ),
    "evaluate_iterable": lambda env: case(
        env,
        before=lambda t: t.evaluate(eval_dataset=ds(4, 1).to_iterable_dataset()),
        check=logged("eval_loss"),
        compared=("eval_loss",),
    ),
    "iterable_dataset": lambda env: case(
        env,
        {"eval_strategy": "steps", "eval_steps": 2},
        train_dataset=ds(4, 0).to_iterable_dataset(),
        eval_dataset=ds(4, 1).to_iterable_dataset(),
        check=logged("eval_loss"),
        compared=("eval_loss",),
    ),
    "vlm": lambda env: vlm_case(env, with_images(standard()), {"max_length": None}, check=vlm_check),
    "vlm_text_only_data": lambda env: vlm_case(env, conversational(), check=lambda t, _: not t._is_vision_dataset),
    "sync_ref_model": lambda env: case(
        env,
        {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
        check=sync_check(env),
    ),
    # On CPU, accelerate accepts fp16=True but enables neither autocast nor a grad scaler (native_amp is False off
    # GPU), for DPOTrainer as for the trainers: the run is fp32 math. Real fp16 numerics: "fp16_weights".
    "fp16": lambda env: case(
        env,
        {"fp16": True},
        check=lambda t, _: t.accelerator.mixed_precision == "fp16" and not t.accelerator.native_amp,
    ),
    # DPOConfig's own default (bf16=True unless fp16 is set): bf16 autocast, which accelerate does run on CPU.
    "bf16": lambda env: case(env, {"bf16": True}, check=lambda t, _: t.accelerator.native_amp),
    "fp16_weights": lambda env: case(
        env, {"model_init_kwargs": {"dtype": "float16"}}, check=lambda t, _: t.model.dtype == torch.float16
    ),
}

#: Settings DPOConfig accepts and the trainers refuse (the methods' margin is defined on DPO's sigmoid loss only):
#: feature -> (DPO fields, the field as the error names it, the fix it names).
REFUSALS = {
    "loss_type_ipo": ({"loss_type": "ipo"}, "loss_type=['ipo']", "Use loss_type='sigmoid_norm'"),
    "loss_type_hinge": ({"loss_type": "hinge"}, "loss_type=['hinge']", "Use loss_type='sigmoid_norm'"),
    "ld_alpha": ({"ld_alpha": 0.5}, "ld_alpha=0.5 (LD-DPO weighting)", "Set ld_alpha=None"),
    "f_divergence": (
        {"f_divergence_type": "js_divergence"},
        "f_divergence_type='js_divergence'",
        "Use f_divergence_type='reverse_kl'",
    ),
}
#: What DPOTrainer itself raises on this CPU-only machine, which the trainers must raise too:
#: feature -> (DPO fields, exception type, message regex, vision data?).
DPO_ERRORS = {
    "vlm_keep_end": (
        {"max_length": 32, "truncation_mode": "keep_end"},
        ValueError,
        "truncation_mode='keep_end' is not supported for vision-language models",
        True,
    ),
    "vlm_precompute": (
        {"max_length": None, "precompute_ref_log_probs": True},
        ValueError,
        "`precompute_ref_log_probs=True` is not supported for vision datasets",
        True,
    ),
    # TRL's activation offloading needs an accelerator: torch.accelerator.current_accelerator() is None on CPU.
    "activation_offloading": (
        {"activation_offloading": True},
        AttributeError,
        "'NoneType' object has no attribute 'type'",
        False,
    ),
    # liger-kernel (Triton kernels, for GPUs) is not installed here.
    "liger_kernel": ({"use_liger_kernel": True}, ImportError, "liger-kernel >= 0.3.0 is not available", False),
}


def _refusal(fields: dict, field_text: str, fix: str) -> Callable[[Env], Case]:
    return lambda env: case(env, fields, refuses=refused(field_text, fix))


def _dpo_error(fields: dict, error: type[BaseException], message: str, vision: bool) -> Callable[[Env], Case]:
    if vision:
        return lambda env: vlm_case(env, with_images(standard()), fields, dpo_error=(error, message))
    return lambda env: case(env, fields, dpo_error=(error, message))


FEATURES.update({name: _refusal(*spec) for name, spec in REFUSALS.items()})
FEATURES.update({name: _dpo_error(*spec) for name, spec in DPO_ERRORS.items()})

#: Cells failing through a trl_cpo defect: feature -> (exception, reason), for every method and config. Empty: the two
#: this matrix found (the first-step gradient check refusing a VLM's unused vision parameters; a streamed eval set
#: passed to evaluate() on a precomputing run) are fixed, and their cells pass.
DEFECTS: dict[str, tuple[type[BaseException], str]] = {}


def outcome(feature: str, method: str, config: str) -> str:
    if feature in REFUSALS:
        return "refuses"
    if feature in DPO_ERRORS:
        return "dpo_error"
    return "parity" if (method, config) == ("cpo", "own") else "trains"


def cells():
    for feature in FEATURES:
        defect = DEFECTS.get(feature)
        marks = [pytest.mark.xfail(raises=defect[0], strict=True, reason=defect[1])] if defect else []
        for method in METHODS:
            for config in ("dpo", "own"):
                kind = outcome(feature, method, config)
                yield pytest.param(
                    feature, method, config, kind, id=f"{feature}-{method}-{config}-{kind}", marks=marks
                )
    yield pytest.param("standard", "cpo", "own", "canary", id="standard-cpo-own-canary")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environment = Env(tmp_path_factory.mktemp("swap"))
    # Speed only. Long-lived objects out of the collector's way: every Trainer.train() runs gc.collect() (accelerate's
    # free_memory), which otherwise walks the whole session's heap each time. One thread: these tiny matmuls gain
    # nothing from more, and lose much when the cores are shared.
    threads = torch.get_num_threads()
    gc.freeze()
    torch.set_num_threads(1)
    yield environment
    torch.set_num_threads(threads)
    gc.unfreeze()


def fields(case: Case, tmp_path, **extra) -> dict:
    base = cpu_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=2, per_device_eval_batch_size=4)
    return {**base, **extra, **case.fields}


def make_args(config: str, config_cls, case: Case, tmp_path):
    return (DPOConfig if config == "dpo" else config_cls)(**fields(case, tmp_path))


def run(trainer_cls, args, case: Case):
    trainer = trainer_cls(args=args, **case.kwargs)
    before = [case.before(trainer)] if case.before is not None else []
    trainer.train()
    history = before + trainer.state.log_history  # train() starts a new log history
    steps = [entry for entry in history if "loss" in entry and "train_runtime" not in entry]
    return trainer, history, steps


def raised(call) -> BaseException:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - whatever DPOTrainer raises is the expectation
        return error
    pytest.fail("no error raised")


def compared(history, steps, keys) -> dict[str, float]:
    values = {f"{key}@{i}": entry[key] for i, entry in enumerate(steps) for key in ("loss", "grad_norm")}
    for key in keys:
        found = [entry[key] for entry in history if key in entry]
        assert found, f"{key} was not logged"
        values.update({f"{key}@{i}": value for i, value in enumerate(found)})
    return values


def assert_parity(dpo: dict[str, float], cpo: dict[str, float]) -> None:
    assert dpo.keys() == cpo.keys() and len(dpo) >= 2 * STEPS, (dpo, cpo)
    mismatched = {k: (dpo[k], cpo[k]) for k in dpo if cpo[k] != pytest.approx(dpo[k], rel=RTOL, abs=ATOL)}
    assert not mismatched, f"CPOTrainer (cpo_gamma=0) differs from DPOTrainer: {mismatched}"


def feature_check(case: Case, trainer, history) -> None:
    if case.check is not None:
        assert case.check(trainer, history) in (None, True), "feature check failed"


@pytest.mark.parametrize("feature, method, config, expected", list(cells()))
def test_dpo_feature_through_swapped_trainer(env, tmp_path, feature, method, config, expected):
    trainer_cls, config_cls, metric = METHODS[method]
    case = FEATURES[feature](env)

    if expected == "refuses":
        DPOConfig(**fields(case, tmp_path))  # DPO takes the setting
        with pytest.raises(ValueError, match=case.refuses) as error:
            trainer_cls(args=make_args(config, config_cls, case, tmp_path), **case.kwargs)
        assert config_cls._method_name in str(error.value)
        return

    if expected == "dpo_error":
        dpo_error = raised(lambda: run(DPOTrainer, DPOConfig(**fields(case, tmp_path)), case))
        assert isinstance(dpo_error, case.dpo_error[0]) and re.search(case.dpo_error[1], str(dpo_error)), dpo_error
        case = FEATURES[feature](env)
        error = raised(lambda: run(trainer_cls, make_args(config, config_cls, case, tmp_path), case))
        assert (type(error), str(error)) == (type(dpo_error), str(dpo_error))
        return

    if expected in ("parity", "canary"):
        dpo_trainer, dpo_history, dpo_steps = run(DPOTrainer, DPOConfig(**fields(case, tmp_path)), case)
        feature_check(case, dpo_trainer, dpo_history)  # the feature does what it should in DPO too
        case = FEATURES[feature](env)  # fresh models and data for the second run
        gamma = 0.0 if expected == "parity" else 0.05
        trainer, history, steps = run(
            CPOTrainer, CPOConfig(**fields(case, tmp_path, **DPO_DEFAULTS), cpo_gamma=gamma), case
        )
        dpo_values, cpo_values = (
            compared(dpo_history, dpo_steps, case.compared),
            compared(history, steps, case.compared),
        )
        if expected == "canary":
            with pytest.raises(AssertionError, match="differs from DPOTrainer"):
                assert_parity(dpo_values, cpo_values)
            return
        assert_parity(dpo_values, cpo_values)
        feature_check(case, trainer, history)
        return

    trainer, history, steps = run(trainer_cls, make_args(config, config_cls, case, tmp_path), case)
    assert len(steps) == STEPS
    for entry in steps:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry[metric]), entry
        assert 0.0 <= entry["u_fraction"] <= 1.0, entry
    if (method, config) == ("cpo", "dpo"):
        assert trainer.args.cpo_gamma == 0.05 and steps[0]["cpo_margin"] > 0  # a plain DPOConfig gets CPO's margin
    feature_check(case, trainer, history)
