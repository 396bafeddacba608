import dataclasses
import math
import sys

import pytest
from datasets import Dataset
from helpers import CPU, cpu_args, unwritable_folder
from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer


def test_cpo_defaults_are_the_released_settings():
    config = CPOConfig(**CPU)
    assert (config.beta, config.cpo_gamma, config.cpo_margin_type) == (2.5, 0.05, "inverse_prob")
    assert config.precompute_ref_log_probs is None  # decided from the data: precomputed where it can be
    assert config.loss_type == ["sigmoid_norm"]  # the CPO term, on per-token averaged log-probs
    assert math.isfinite(config.cpo_max_margin) and config.cpo_max_margin > 0


def test_ecpoc_defaults_are_the_released_settings():
    config = ECPOCConfig(**CPU)
    assert (config.ecpoc_gamma, config.ecpoc_tau, config.ecpoc_alpha) == (0.5, 2.0, 1.0)
    assert config.beta == 2.5 and config.loss_type == ["sigmoid_norm"]


@pytest.mark.parametrize("cls", [CPOConfig, ECPOCConfig])
def test_method_fields_are_prefixed_and_length_normalize_is_gone(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = "cpo_" if cls is CPOConfig else "ecpoc_"
    assert f"{prefix}gamma" in names
    assert not names & {"gamma", "tau", "alpha", "margin_type", "max_margin", "length_normalize"}


def test_loss_type_alone_picks_the_space_and_is_never_rewritten():
    assert CPOConfig(**CPU, loss_type="sigmoid").loss_type == ["sigmoid"]
    assert CPOConfig(**CPU, loss_type="sigmoid_norm").loss_type == ["sigmoid_norm"]
    summed = dataclasses.replace(CPOConfig(**CPU), loss_type=["sigmoid"])
    assert summed.loss_type == ["sigmoid"]
    config = CPOConfig(**CPU, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1])
    assert config.loss_type == ["sigmoid", "sft"]
    config = ECPOCConfig(**CPU, loss_type=["sft", "sigmoid_norm"], loss_weights=[0.1, 1.0])
    assert config.loss_type == ["sft", "sigmoid_norm"]
    with pytest.raises(ValueError, match="exactly one preference term"):
        CPOConfig(**CPU, loss_type=["sigmoid", "sigmoid_norm"], loss_weights=[1.0, 1.0])


@pytest.mark.parametrize(
    "cls, kwargs, field_name",
    [
        (CPOConfig, {"cpo_gamma": -0.1}, "cpo_gamma"),
        (CPOConfig, {"cpo_gamma": math.nan}, "cpo_gamma"),
        (CPOConfig, {"cpo_margin_type": "exp"}, "cpo_margin_type"),
        (CPOConfig, {"cpo_max_margin": 0.0}, "cpo_max_margin"),
        (CPOConfig, {"cpo_max_margin": -1.0}, "cpo_max_margin"),
        (CPOConfig, {"cpo_max_margin": math.inf}, "cpo_max_margin"),
        (CPOConfig, {"beta": 0.0}, "beta"),
        (CPOConfig, {"loss_type": "ipo"}, "loss_type"),
        (CPOConfig, {"loss_type": ["hinge", "sft"]}, "loss_type"),
        (CPOConfig, {"loss_type": "sft"}, "loss_type"),
        (CPOConfig, {"f_divergence_type": "js_divergence"}, "f_divergence_type"),
        (CPOConfig, {"ld_alpha": 0.5}, "ld_alpha"),
        (CPOConfig, {"precompute_ref_log_probs": "yes"}, "precompute_ref_log_probs"),
        (CPOConfig, {"precompute_ref_log_probs": False, "cpo_auto_gamma": 0.9}, "cpo_auto_gamma"),
        (ECPOCConfig, {"ecpoc_tau": 0.0}, "ecpoc_tau"),
        (ECPOCConfig, {"ecpoc_tau": -2.0}, "ecpoc_tau"),
        (ECPOCConfig, {"ecpoc_alpha": 0.0}, "ecpoc_alpha"),
        (ECPOCConfig, {"ecpoc_alpha": -1.0}, "ecpoc_alpha"),
        (ECPOCConfig, {"ecpoc_gamma": -0.5}, "ecpoc_gamma"),
        (ECPOCConfig, {"loss_type": "apo_zero"}, "loss_type"),
        (ECPOCConfig, {"f_divergence_type": "forward_kl"}, "f_divergence_type"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(cls, kwargs, field_name):
    with pytest.raises(ValueError, match=field_name) as excinfo:
        cls(**CPU, **kwargs)
    assert "Set" in str(excinfo.value) or "Use" in str(excinfo.value)  # the message says how to fix it


@pytest.mark.parametrize(
    "cls, field_name",
    [
        (CPOConfig, "cpo_gamma"),
        (CPOConfig, "cpo_margin_type"),
        (CPOConfig, "cpo_max_margin"),
        (ECPOCConfig, "ecpoc_gamma"),
        (ECPOCConfig, "ecpoc_tau"),
        (ECPOCConfig, "ecpoc_alpha"),
    ],
)
def test_none_is_refused_for_every_method_field(cls, field_name):
    # A YAML `cpo_max_margin:` with no value, or a script passing None, must not slip through as "unset".
    with pytest.raises(ValueError, match=f"{field_name}=None is invalid") as excinfo:
        cls(**CPU, **{field_name: None})
    assert "Set" in str(excinfo.value)


def test_cpo_auto_gamma_none_means_off():
    assert CPOConfig(**CPU, cpo_auto_gamma=None).cpo_auto_gamma is None


def test_an_output_dir_that_is_a_file_is_refused_by_the_config(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for path in (a_file, a_file / "run"):
        with pytest.raises(ValueError, match="output_dir=") as excinfo:
            CPOConfig(**{**CPU, "output_dir": str(path)})
        assert "is a file" in str(excinfo.value) and str(a_file) in str(excinfo.value)
    assert CPOConfig(**{**CPU, "output_dir": str(tmp_path / "new" / "run")})  # missing folders are fine


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(train_dataset, tmp_path):
    args = CPOConfig(**{**CPU, "output_dir": unwritable_folder(tmp_path)})
    with pytest.raises(ValueError, match="output_dir=.* cannot be written"):
        CPOTrainer(model="/nonexistent/model", args=args, train_dataset=train_dataset)


def test_unsupported_loss_type_message_lists_what_works():
    with pytest.raises(ValueError) as excinfo:
        CPOConfig(**CPU, loss_type="ipo")
    message = str(excinfo.value)
    assert "'sigmoid_norm'" in message and "'sigmoid'" in message
    assert "'sft'" in message and "loss_weights" in message


def test_infinite_tau_is_accepted():
    assert ECPOCConfig(**CPU, ecpoc_tau=math.inf).ecpoc_tau == math.inf


def test_bad_dpo_config_fails_before_the_model_is_loaded(train_dataset):
    # The model path does not exist: loading it would raise OSError. The config error must come first.
    args = DPOConfig(**CPU, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type"):
        CPOTrainer(model="/nonexistent/model", args=args, train_dataset=train_dataset)


def test_what_a_live_reference_cannot_do_fails_before_the_model_is_loaded(train_dataset):
    # An IterableDataset trains with a live reference, but cpo_auto_gamma needs the whole train set up front.
    with pytest.raises(ValueError, match="IterableDataset"):
        CPOTrainer(
            model="/nonexistent/model",
            args=CPOConfig(**CPU, cpo_auto_gamma=0.9),
            train_dataset=train_dataset.to_iterable_dataset(),
        )


def test_wrong_config_class_is_rejected(train_dataset):
    with pytest.raises(TypeError, match="ECPOCConfig"):
        ECPOCTrainer(model="/nonexistent/model", args=CPOConfig(**CPU), train_dataset=train_dataset)


def test_trlparser_reads_cli_and_yaml(tmp_path, monkeypatch):
    parser = TrlParser((ScriptArguments, CPOConfig, ModelConfig))
    _, config, _ = parser.parse_args_and_config(
        ["--dataset_name", "local", "--output_dir", str(tmp_path), "--cpo_gamma", "0.1"]
        + ["--cpo_margin_type", "inverse_logp", "--use_cpu", "--bf16", "false", "--report_to", "none"]
    )
    assert isinstance(config, CPOConfig) and config.cpo_gamma == 0.1 and config.cpo_margin_type == "inverse_logp"
    assert config.loss_type == ["sigmoid_norm"]

    yaml_file = tmp_path / "cpo.yaml"
    yaml_file.write_text(
        f"dataset_name: local\noutput_dir: {tmp_path}\ncpo_gamma: 0.2\ncpo_max_margin: 5.0\nloss_type: sigmoid\n"
        "use_cpu: true\nbf16: false\nreport_to: none\n"
    )
    monkeypatch.setattr(sys, "argv", ["prog", "--config", str(yaml_file)])
    _, config, _ = TrlParser((ScriptArguments, CPOConfig, ModelConfig)).parse_args_and_config()
    assert (config.cpo_gamma, config.cpo_max_margin, config.loss_type) == (0.2, 5.0, ["sigmoid"])

    parser = TrlParser((ScriptArguments, ECPOCConfig, ModelConfig))
    _, config, _ = parser.parse_args_and_config(
        ["--dataset_name", "d", "--output_dir", str(tmp_path), "--ecpoc_tau", "inf", "--use_cpu", "--bf16", "false"]
    )
    assert config.ecpoc_tau == math.inf


@pytest.mark.parametrize("old_flag", ["--gamma", "--tau", "--length_normalize"])
def test_old_unprefixed_flags_are_rejected(tmp_path, old_flag):
    parser = TrlParser((ScriptArguments, ECPOCConfig, ModelConfig))
    with pytest.raises(ValueError, match=f"not used by the HfArgumentParser: \\['{old_flag}'"):
        parser.parse_args_and_config(
            ["--dataset_name", "d", "--output_dir", str(tmp_path), old_flag, "1", "--use_cpu", "--bf16", "false"]
        )


def test_bad_value_from_the_command_line_fails_at_parse_time(tmp_path):
    parser = TrlParser((ScriptArguments, CPOConfig, ModelConfig))
    with pytest.raises(ValueError, match="cpo_gamma=-1"):
        parser.parse_args_and_config(
            ["--dataset_name", "d", "--output_dir", str(tmp_path), "--cpo_gamma", "-1", "--use_cpu", "--bf16", "false"]
        )


def _dpo_fields(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(DPOConfig) if f.init}


def test_plain_dpo_config_is_kept_as_is_and_precomputes_when_the_data_allows(
    model, tokenizer, train_dataset, tmp_path, caplog
):
    # DPOConfig's own defaults, beta 0.1 and loss_type 'sigmoid' (summed), are kept: nothing is "upgraded".
    args = DPOConfig(**cpu_args(tmp_path, learning_rate=3e-4, max_steps=1))
    assert (args.beta, args.loss_type, args.precompute_ref_log_probs) == (0.1, ["sigmoid"], False)
    # Built before the trainer: creating training arguments resets accelerate's state, which the trainer holds.
    defaults = CPOConfig(**CPU)
    with caplog.at_level("WARNING", logger="trl_cpo"):
        trainer = CPOTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, CPOConfig)
    assert (trainer.args.beta, trainer.args.loss_type) == (0.1, ["sigmoid"])
    assert trainer.args.precompute_ref_log_probs and not trainer.length_normalized
    expected = {**_dpo_fields(args), "precompute_ref_log_probs": True}
    changed = {k: (v, expected[k]) for k, v in _dpo_fields(trainer.args).items() if v != expected[k]}
    assert not changed, changed
    # The method's own fields take the CPOConfig defaults.
    assert (trainer.args.cpo_gamma, trainer.args.cpo_margin_type, trainer.args.cpo_max_margin) == (
        defaults.cpo_gamma,
        defaults.cpo_margin_type,
        defaults.cpo_max_margin,
    )
    # One log line, naming the only field read differently and what it resolved to.
    records = [r for r in caplog.records if r.name.startswith("trl_cpo") and "DPOConfig" in r.getMessage()]
    assert len(records) == 1 and "precompute_ref_log_probs" in records[0].getMessage()
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert steps and all("cpo_margin" in h for h in steps)


def test_default_dpo_config_is_kept_by_the_ecpoc_trainer(model, tokenizer, train_dataset, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    trainer = ECPOCTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, ECPOCConfig)
    assert (trainer.args.beta, trainer.args.loss_type) == (0.1, ["sigmoid"])  # DPO's, not E-CPOC's 2.5 / sigmoid_norm
    assert (trainer.args.ecpoc_gamma, trainer.args.ecpoc_tau, trainer.args.ecpoc_alpha) == (0.5, 2.0, 1.0)
    assert trainer.args.precompute_ref_log_probs


@pytest.mark.parametrize("dpo_loss_type", ["sigmoid", "sigmoid_norm"])
def test_from_dpo_config_keeps_beta_and_loss_type(tmp_path, dpo_loss_type, caplog):
    from trl_cpo._config_utils import from_dpo_config

    args = DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.2, loss_type=dpo_loss_type
    )
    with caplog.at_level("WARNING", logger="trl_cpo"):
        config = from_dpo_config(args, CPOConfig)
    assert type(config) is CPOConfig
    # DPOConfig's default False is read as "decide from the data" (the trainer logs what it decided)
    assert (config.beta, config.loss_type, config.precompute_ref_log_probs) == (0.2, [dpo_loss_type], None)
    # Already precomputing: nothing changes, so nothing is logged.
    caplog.clear()
    args = DPOConfig(**CPU, precompute_ref_log_probs=True, loss_type=dpo_loss_type)
    with caplog.at_level("WARNING", logger="trl_cpo"):
        config = from_dpo_config(args, ECPOCConfig)
    assert _dpo_fields(config) == _dpo_fields(args)
    assert not [r for r in caplog.records if r.name.startswith("trl_cpo")]


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
