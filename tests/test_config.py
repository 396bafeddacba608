import dataclasses
import math
import sys

import pytest
from datasets import Dataset
from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer

CPU = dict(output_dir="unused", report_to="none", use_cpu=True, bf16=False)


def test_cpo_defaults_are_the_released_settings():
    config = CPOConfig(**CPU)
    assert (config.beta, config.gamma, config.margin_type) == (2.5, 0.05, "inverse_prob")
    assert config.length_normalize and config.precompute_ref_log_probs
    assert config.loss_type == ["sigmoid_norm"]  # the CPO term, on averaged log-probs
    assert math.isfinite(config.max_margin) and config.max_margin > 0


def test_ecpoc_defaults_are_the_released_settings():
    config = ECPOCConfig(**CPU)
    assert (config.gamma, config.tau, config.alpha) == (0.5, 2.0, 1.0)
    assert config.loss_type == ["sigmoid_norm"]


def test_length_normalize_picks_trl_loss_term_and_keeps_sft():
    assert CPOConfig(**CPU, length_normalize=False).loss_type == ["sigmoid"]
    # either spelling names the CPO term; length_normalize alone sets the scale, so a config can be re-derived
    assert CPOConfig(**CPU, loss_type="sigmoid_norm", length_normalize=False).loss_type == ["sigmoid"]
    summed = dataclasses.replace(CPOConfig(**CPU), length_normalize=False)
    assert summed.loss_type == ["sigmoid"] and not summed.length_normalize
    config = CPOConfig(**CPU, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1])
    assert config.loss_type == ["sigmoid_norm", "sft"]


@pytest.mark.parametrize(
    "cls, kwargs, field_name",
    [
        (CPOConfig, {"gamma": -0.1}, "gamma"),
        (CPOConfig, {"gamma": math.nan}, "gamma"),
        (CPOConfig, {"margin_type": "exp"}, "margin_type"),
        (CPOConfig, {"max_margin": 0.0}, "max_margin"),
        (CPOConfig, {"max_margin": -1.0}, "max_margin"),
        (CPOConfig, {"max_margin": math.inf}, "max_margin"),
        (CPOConfig, {"beta": 0.0}, "beta"),
        (CPOConfig, {"loss_type": "ipo"}, "loss_type"),
        (CPOConfig, {"loss_type": ["hinge", "sft"]}, "loss_type"),
        (CPOConfig, {"loss_type": "sft"}, "loss_type"),
        (CPOConfig, {"f_divergence_type": "js_divergence"}, "f_divergence_type"),
        (CPOConfig, {"ld_alpha": 0.5}, "ld_alpha"),
        (CPOConfig, {"precompute_ref_log_probs": False}, "precompute_ref_log_probs"),
        (CPOConfig, {"sync_ref_model": True}, "sync_ref_model"),
        (ECPOCConfig, {"tau": 0.0}, "tau"),
        (ECPOCConfig, {"tau": -2.0}, "tau"),
        (ECPOCConfig, {"alpha": 0.0}, "alpha"),
        (ECPOCConfig, {"alpha": -1.0}, "alpha"),
        (ECPOCConfig, {"gamma": -0.5}, "gamma"),
        (ECPOCConfig, {"loss_type": "apo_zero"}, "loss_type"),
        (ECPOCConfig, {"f_divergence_type": "forward_kl"}, "f_divergence_type"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(cls, kwargs, field_name):
    with pytest.raises(ValueError, match=field_name) as excinfo:
        cls(**CPU, **kwargs)
    assert "Set" in str(excinfo.value) or "Use" in str(excinfo.value)  # the message says how to fix it


def test_unsupported_loss_type_message_lists_what_works():
    with pytest.raises(ValueError) as excinfo:
        CPOConfig(**CPU, loss_type="ipo")
    message = str(excinfo.value)
    assert "'sigmoid'" in message and "'sft'" in message and "loss_weights" in message


def test_infinite_tau_is_accepted():
    assert ECPOCConfig(**CPU, tau=math.inf).tau == math.inf


def test_bad_dpo_config_fails_before_the_model_is_loaded(train_dataset):
    # The model path does not exist: loading it would raise OSError. The config error must come first.
    args = DPOConfig(**CPU, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type"):
        CPOTrainer(model="/nonexistent/model", args=args, train_dataset=train_dataset)


def test_iterable_dataset_fails_before_the_model_is_loaded(train_dataset):
    with pytest.raises(ValueError, match="IterableDataset"):
        CPOTrainer(
            model="/nonexistent/model", args=CPOConfig(**CPU), train_dataset=train_dataset.to_iterable_dataset()
        )


def test_wrong_config_class_is_rejected(train_dataset):
    with pytest.raises(TypeError, match="ECPOCConfig"):
        ECPOCTrainer(model="/nonexistent/model", args=CPOConfig(**CPU), train_dataset=train_dataset)


def test_trlparser_reads_cli_and_yaml(tmp_path, monkeypatch):
    parser = TrlParser((ScriptArguments, CPOConfig, ModelConfig))
    _, config, _ = parser.parse_args_and_config(
        ["--dataset_name", "local", "--output_dir", str(tmp_path), "--gamma", "0.1", "--margin_type", "inverse_logp"]
        + ["--use_cpu", "--bf16", "false", "--report_to", "none"]
    )
    assert isinstance(config, CPOConfig) and config.gamma == 0.1 and config.margin_type == "inverse_logp"

    yaml_file = tmp_path / "cpo.yaml"
    yaml_file.write_text(
        f"dataset_name: local\noutput_dir: {tmp_path}\ngamma: 0.2\nmax_margin: 5.0\nlength_normalize: false\n"
        "use_cpu: true\nbf16: false\nreport_to: none\n"
    )
    monkeypatch.setattr(sys, "argv", ["prog", "--config", str(yaml_file)])
    _, config, _ = TrlParser((ScriptArguments, CPOConfig, ModelConfig)).parse_args_and_config()
    assert (config.gamma, config.max_margin, config.length_normalize) == (0.2, 5.0, False)
    assert config.loss_type == ["sigmoid"]

    parser = TrlParser((ScriptArguments, ECPOCConfig, ModelConfig))
    _, config, _ = parser.parse_args_and_config(
        ["--dataset_name", "d", "--output_dir", str(tmp_path), "--tau", "inf", "--use_cpu", "--bf16", "false"]
    )
    assert config.tau == math.inf


def test_bad_value_from_the_command_line_fails_at_parse_time(tmp_path):
    parser = TrlParser((ScriptArguments, CPOConfig, ModelConfig))
    with pytest.raises(ValueError, match="gamma"):
        parser.parse_args_and_config(
            ["--dataset_name", "d", "--output_dir", str(tmp_path), "--gamma", "-1", "--use_cpu", "--bf16", "false"]
        )


def test_plain_dpo_config_is_upgraded_keeping_user_fields(model, tokenizer, train_dataset, tmp_path, caplog):
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        learning_rate=3e-4,  # set by the user: kept
        beta=0.3,  # set by the user (not DPO's default): kept
        per_device_train_batch_size=4,
        max_steps=1,
        gradient_checkpointing=False,
        save_strategy="no",
    )
    with caplog.at_level("WARNING", logger="trl_cpo"):
        trainer = CPOTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, CPOConfig)
    assert trainer.args.learning_rate == 3e-4 and trainer.args.beta == 0.3
    assert trainer.args.per_device_train_batch_size == 4 and trainer.args.output_dir == str(tmp_path)
    assert trainer.args.precompute_ref_log_probs and trainer.args.gamma == 0.05
    assert "upgraded it to CPOConfig" in caplog.text and "precompute_ref_log_probs" in caplog.text
    trainer.train()
    assert "cpo_margin" in trainer.state.log_history[0]


def test_default_dpo_beta_is_upgraded(model, tokenizer, train_dataset, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    trainer = ECPOCTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, ECPOCConfig) and trainer.args.beta == 2.5 and trainer.args.tau == 2.0
    assert trainer.args.length_normalize and trainer.args.loss_type == ["sigmoid_norm"]


@pytest.mark.parametrize("dpo_loss_type, length_normalize", [("sigmoid", False), ("sigmoid_norm", True)])
def test_user_beta_keeps_the_dpo_log_prob_scale(tmp_path, dpo_loss_type, length_normalize):
    # beta 0.2 was tuned for the DPO loss's scale: silently switching summed -> averaged would change its meaning
    from trl_cpo._config_utils import upgrade_dpo_config

    args = DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.2, loss_type=dpo_loss_type
    )
    config = upgrade_dpo_config(args, CPOConfig)
    assert config.beta == 0.2 and config.length_normalize is length_normalize
    assert config.loss_type == [dpo_loss_type]


def test_no_args_gives_method_named_output_dir(model, tokenizer, train_dataset, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # TRL's default config asks for bf16; build the CPU default the same way a user would on a GPU box.
    monkeypatch.setattr(CPOConfig, "__init__", _cpu_init(CPOConfig.__init__))
    trainer = CPOTrainer(
        model=model, train_dataset=Dataset.from_list(train_dataset.to_list()), processing_class=tokenizer
    )
    assert trainer.args.output_dir.endswith("-CPO")


def _cpu_init(init):
    def wrapped(self, *args, **kwargs):
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("report_to", "none")
        init(self, *args, **kwargs)

    return wrapped
