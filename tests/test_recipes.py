"""The train script `trl_cpo.scripts.train` (`trl-cpo train`), the recipe `recipes/cpo_llama3.py` that calls it, its
configs and its accelerate configs.

Real runs on CPU of the very script users launch: the tiny offline config through `accelerate launch` (one process)
and through `torchrun --nproc_per_node 2` (two processes, DDP over gloo), on a tiny Llama built by
`recipes/make_tiny_model.py` and the preference pairs shipped in `recipes/data/`. The Llama-3-8B configs are parsed
(not run: no GPU here) and checked against the released settings. FSDP2 and DeepSpeed ZeRO-3 are not applied by
accelerate on CPU, so their configs are checked as files and as the environment accelerate would launch with.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from helpers import first_step_accuracy_is_roundoff, load_script, subprocess_env, unwritable_folder
from trl import DPOConfig, DPOTrainer

from trl_cpo import CPOConfig, ECPOCConfig
from trl_cpo.scripts import train as train_script

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "cpo_llama3.py"
CONFIGS = REPO / "recipes" / "configs"
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate_configs"
TINY_DATA = REPO / "recipes" / "data" / "tiny_prefs.jsonl"


@pytest.fixture(scope="module")
def recipe():
    return train_script


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    make_tiny_model = load_script("make_tiny_model", REPO / "recipes" / "make_tiny_model.py")
    out = tmp_path_factory.mktemp("recipe") / "tiny-llama"
    make_tiny_model.main([str(out)])  # the helper's own command line
    return out


def run_recipe(launcher: list[str], args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *launcher, str(RECIPE), "--config", str(CONFIGS / "tiny_cpu.yaml"), *args],
        cwd=REPO,  # the config's data path is relative to the repo root
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"recipe failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def read_run(out: Path):
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    return json.loads((out / "train_results.json").read_text()), steps, (out / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# Real runs of the tiny offline config
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_config_is_offline_and_documented():
    config = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    make_tiny_model = load_script("make_tiny_model", REPO / "recipes" / "make_tiny_model.py")
    assert config["model_name_or_path"] == make_tiny_model.DEFAULT_OUT
    assert (REPO / config["dataset_name"]) == TINY_DATA
    assert config["use_cpu"] is True and config["bf16"] is False
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    assert len(rows) == 64 and len({json.dumps(r) for r in rows}) == 64
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)


@pytest.mark.multiprocess
def test_tiny_recipe_with_accelerate_launch(tiny_model, tmp_path):
    out = tmp_path / "cpo"
    launcher = ["accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    run_recipe(launcher, ["--model_name_or_path", str(tiny_model), "--output_dir", str(out)])
    results, steps, card = read_run(out)
    assert results["num_processes"] == 1 and results["train_samples"] == 64
    assert len(steps) == 64 // (4 * 2)  # per-device batch 4 x grad-accum 2
    for step in steps:
        assert torch.isfinite(torch.tensor(step["loss"]))
        assert {"u_fraction", "ref_misaligned_fraction", "cpo_margin"} <= step.keys()
    assert (out / "model.safetensors").is_file()
    assert "### Method: CPO (Constrained Preference Optimization)" in card
    assert "- Dataset: the local dataset `tiny_prefs.jsonl`" in card and "| `cpo_gamma` | `0.05` |" in card


@pytest.mark.multiprocess
def test_tiny_recipe_with_torchrun_two_processes(tiny_model, tmp_path):
    out = tmp_path / "ecpoc"
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    args = ["--model_name_or_path", str(tiny_model), "--output_dir", str(out)]
    args += ["--method", "ecpoc", "--ecpoc_gamma", "0.5", "--ecpoc_tau", "2.0", "--ecpoc_alpha", "1.0"]
    run_recipe(launcher, args)
    results, steps, card = read_run(out)
    assert results["num_processes"] == 2 and results["train_samples"] == 64
    assert len(steps) == 64 // (2 * 4 * 2)  # 2 processes x per-device batch 4 x grad-accum 2
    for step in steps:
        assert {"u_fraction", "ref_misaligned_fraction", "ecpoc_target"} <= step.keys()
    assert (out / "model.safetensors").is_file()
    assert "### Method: E-CPOC" in card and "| `ecpoc_tau` | `2.0` |" in card


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------------
# The shipped Llama-3 configs (parsed, not run)
# ----------------------------------------------------------------------------------------------------------------------

RELEASED = {
    "beta": 2.5,
    "learning_rate": 6e-7,
    "warmup_steps": 0.1,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "max_length": 2048,
    "bf16": True,
    "gradient_checkpointing": True,
    "loss_type": ["sigmoid_norm"],
    "precompute_ref_log_probs": True,
}


@pytest.mark.parametrize(
    "name, config_cls, method_values, peft",
    [
        ("cpo_llama3_8b_instruct_full", CPOConfig, {"cpo_gamma": 0.05, "cpo_margin_type": "inverse_prob"}, False),
        (
            "ecpoc_llama3_8b_instruct_full",
            ECPOCConfig,
            {"ecpoc_gamma": 0.5, "ecpoc_tau": 2.0, "ecpoc_alpha": 1.0},
            False,
        ),
        ("cpo_llama3_8b_instruct_qlora", CPOConfig, {"cpo_gamma": 0.05, "cpo_margin_type": "inverse_prob"}, True),
    ],
)
def test_llama3_configs_hold_the_released_settings(recipe, name, config_cls, method_values, peft):
    # use_cpu: bf16 is only accepted on a GPU or with use_cpu; nothing is run here.
    script_args, args, model_args, _ = recipe.parse_args(
        ["--config", str(CONFIGS / f"{name}.yaml"), "--use_cpu", "true"]
    )
    assert type(args) is config_cls
    expected = {**RELEASED, **method_values}
    if peft:
        expected["learning_rate"] = 5e-6  # LoRA: the recipe's choice, documented as not released
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.lr_scheduler_type == "cosine"
    assert model_args.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct" and model_args.dtype == "bfloat16"
    assert script_args.dataset_name == "HuggingFaceH4/ultrafeedback_binarized"
    assert (script_args.dataset_train_split, script_args.dataset_test_split) == ("train_prefs", "test_prefs")
    assert (model_args.use_peft, model_args.load_in_4bit) == (peft, peft)
    if peft:
        assert model_args.bnb_4bit_quant_type == "nf4" and model_args.lora_target_modules == "all-linear"


def test_method_switch_and_command_line_overrides(recipe, caplog):
    full = ["--config", str(CONFIGS / "cpo_llama3_8b_instruct_full.yaml"), "--use_cpu", "true"]
    with caplog.at_level(logging.WARNING, logger="trl_cpo.scripts.train"):
        _, dpo, _, _ = recipe.parse_args([*full, "--method", "dpo"])
    assert type(dpo) is recipe.DPOBaselineConfig and dpo.cpo_gamma == 0.0
    assert (dpo.beta, dpo.loss_type, dpo.learning_rate) == (2.5, ["sigmoid_norm"], 6e-7)  # same settings as CPO
    assert "method=dpo does not use cpo_gamma=0.05" in caplog.text

    argv = [*full, "--cpo_gamma", "0.1", "--cpo_margin_type", "inverse_logp", "--beta", "1.0"]
    _, cpo, _, _ = recipe.parse_args(argv)
    assert (cpo.cpo_gamma, cpo.cpo_margin_type, cpo.beta) == (0.1, "inverse_logp", 1.0)
    _, summed, _, _ = recipe.parse_args([*full, "--loss_type", "sigmoid", "--learning_rate", "1e-6"])
    assert summed.loss_type == ["sigmoid"] and summed.learning_rate == 1e-6
    _, summed_dpo, _, _ = recipe.parse_args([*full, "--method", "dpo", "--loss_type", "sigmoid"])
    assert summed_dpo.loss_type == ["sigmoid"] and summed_dpo.beta == 2.5

    # A CPO config switched to E-CPOC: the E-CPOC fields take E-CPOC's defaults, the CPO ones are ignored (warned).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_cpo.scripts.train"):
        _, ecpoc, _, _ = recipe.parse_args([*full, "--method", "ecpoc", "--ecpoc_tau", "inf", "--ecpoc_alpha", "0.5"])
    assert type(ecpoc) is ECPOCConfig
    assert (ecpoc.ecpoc_gamma, ecpoc.ecpoc_tau, ecpoc.ecpoc_alpha) == (0.5, float("inf"), 0.5)
    assert "method=ecpoc does not use cpo_gamma=0.05, cpo_margin_type='inverse_prob'" in caplog.text

    with pytest.raises(ValueError, match="cpo_gamma=-1"):
        recipe.parse_args([*full, "--cpo_gamma", "-1"])
    with pytest.raises(ValueError, match="ecpoc_tau=0"):
        recipe.parse_args([*full, "--method", "ecpoc", "--ecpoc_tau", "0"])
    with pytest.raises(SystemExit):
        recipe.parse_args([*full, "--cpo_margin_type", "nope"])
    for old in ("--gamma", "--tau", "--length_normalize"):
        with pytest.raises(ValueError, match=old):
            recipe.parse_args([*full, old, "1"])


def test_method_tables_derive_from_the_package_table(recipe):
    from trl_cpo.methods import METHODS
    from trl_cpo.trainers import trainer_class

    assert recipe.METHODS == ("cpo", "ecpoc", "dpo", "hypo")
    for name, method in METHODS.items():
        assert recipe.TRAINERS[name] is trainer_class(method)
        assert recipe.CONFIG_CLASSES[name] is method.config_class
        assert recipe.METHOD_FIELDS[name] == (*method.fields, *method.config_only_fields)
    assert recipe.TRAINERS["dpo"] is recipe.DPOBaselineTrainer and recipe.METHOD_FIELDS["dpo"] == ()
    assert recipe.DPOBaselineTrainer.method.config_class is recipe.DPOBaselineConfig
    assert trainer_class(recipe.DPOBaselineTrainer.method) is recipe.DPOBaselineTrainer
    assert not hasattr(recipe, "GAMMA_MEANING")


def test_unknown_config_keys_fail(recipe, tmp_path):
    config = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    config["cpo_gama"] = 0.1
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="cpo_gama"):
        recipe.parse_args(["--config", str(path)])


class _StopBeforeTraining(Exception):
    pass


@pytest.fixture
def script_loads(recipe, monkeypatch):
    """Record the data load and the trainer construction of `train()`; the fake trainer records what `train()` gets
    and stops there."""
    calls = []

    class FakeTrainer:
        model_card_kwargs: dict = {}

        def train(self, resume_from_checkpoint=None):
            calls.append(("train", resume_from_checkpoint))
            raise _StopBeforeTraining

    def load_datasets(script_args, dataset_args):
        calls.append("data")
        return DatasetDict({"train": Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])})

    def build_trainer(*args, **kwargs):
        calls.append("model")
        return FakeTrainer()

    monkeypatch.setattr(recipe, "load_datasets", load_datasets)
    monkeypatch.setattr(recipe, "build_trainer", build_trainer)
    return calls


def _complete_checkpoint(folder: Path) -> str:
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))  # readable: a complete checkpoint's is parsed
    (folder / "trainer_state.json").write_text("{}")
    return str(folder)


def test_resume_flags_true_and_last_mean_the_newest_complete_checkpoint(recipe, tmp_path, script_loads):
    run = tmp_path / "run"
    base = ["--config", str(CONFIGS / "tiny_cpu.yaml"), "--output_dir", str(run)]
    for value in ("true", "True", "last"):
        assert recipe.parse_args([*base, "--resume_from_checkpoint", value])[1].resume_from_checkpoint is True
    assert recipe.parse_args([*base, "--resume_from_checkpoint", "false"])[1].resume_from_checkpoint is None
    checkpoint = _complete_checkpoint(run / "checkpoint-2")
    assert recipe.parse_args([*base, "--resume_from_checkpoint", checkpoint])[1].resume_from_checkpoint == checkpoint
    # train() hands True to trainer.train (the trainers resolve it to the newest complete checkpoint).
    with pytest.raises(_StopBeforeTraining):
        recipe.train(*recipe.parse_args([*base, "--resume_from_checkpoint", "true"]))
    assert script_loads == ["data", "model", ("train", True)]


def test_the_train_script_refuses_bad_outputs_and_resumes_before_loading(recipe, tmp_path, script_loads):
    base = ["--config", str(CONFIGS / "tiny_cpu.yaml")]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="output_dir=.* is a file"):
        recipe.parse_args([*base, "--output_dir", str(a_file)])
    with pytest.raises(ValueError, match="output_dir=.* cannot be written"):
        recipe.train(*recipe.parse_args([*base, "--output_dir", unwritable_folder(tmp_path)]))
    empty = ["--output_dir", str(tmp_path / "empty")]
    with pytest.raises(ValueError, match="has no checkpoint-N folder"):
        recipe.train(*recipe.parse_args([*base, *empty, "--resume_from_checkpoint", "last"]))
    with pytest.raises(ValueError, match="resume_from_checkpoint=.*does not exist"):
        recipe.train(*recipe.parse_args([*base, *empty, "--resume_from_checkpoint", str(tmp_path / "nope")]))
    assert script_loads == []  # neither the data nor the model was loaded


# ----------------------------------------------------------------------------------------------------------------------
# DPO baseline and data loading (in-process runs)
# ----------------------------------------------------------------------------------------------------------------------


def test_dpo_baseline_is_trl_dpo_with_the_same_beta_and_normalization(recipe, tiny_model, tmp_path):
    """`--method dpo` trains exactly like TRL's DPOTrainer with loss_type='sigmoid_norm' and the same beta."""
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()][:16]
    common = dict(use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False, disable_tqdm=True)
    common.update(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, logging_steps=1, seed=0)
    common.update(save_strategy="no", beta=2.5, precompute_ref_log_probs=True, max_length=64)
    baseline = recipe.DPOBaselineTrainer(
        str(tiny_model),
        args=recipe.DPOBaselineConfig(output_dir=str(tmp_path / "baseline"), **common),
        train_dataset=Dataset.from_list(rows),
    )
    baseline.train()
    dpo = DPOTrainer(
        str(tiny_model),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), loss_type=["sigmoid_norm"], **common),
        train_dataset=Dataset.from_list(rows),
    )
    dpo.train()
    ours = [h for h in baseline.state.log_history if "loss" in h]
    theirs = [h for h in dpo.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
            if first_step_accuracy_is_roundoff(step, key, a, b):
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert a["cpo_margin"] == 0.0 and "u_fraction" in a
    for (name, ours_param), theirs_param in zip(baseline.model.named_parameters(), dpo.model.parameters()):
        # Adam turns the round-off between the two precomputes (differently padded batches) into ~1e-6 weight
        # differences after 3 steps (weights ~0.08; measured max 1.3e-6): far below any training effect.
        torch.testing.assert_close(ours_param, theirs_param, rtol=1e-5, atol=5e-6, msg=name)


def test_local_dataset_formats(recipe, tmp_path):
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as f:
        f.write(TINY_DATA.read_text())
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved-dataset"))
    DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:8])}).save_to_disk(
        str(tmp_path / "saved-dict")
    )
    for name in (TINY_DATA, tmp_path / "pairs.parquet", tmp_path / "pairs.jsonl.gz", tmp_path / "saved-dataset"):
        dataset = recipe.load_preference_dataset(str(name))
        assert list(dataset) == ["train"] and dataset["train"].num_rows == 64, name
        assert dataset["train"][0] == rows[0]
    dataset = recipe.load_preference_dataset(str(tmp_path / "saved-dict"))
    assert {k: v.num_rows for k, v in dataset.items()} == {"train_prefs": 64, "test_prefs": 8}
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        recipe.load_preference_dataset(str(tmp_path / "pairs.txt"))


def ultrafeedback_like(rows):
    """The schema of HuggingFaceH4/ultrafeedback_binarized: a string prompt next to full conversations."""
    out = []
    for i, row in enumerate(rows):
        user = {"role": "user", "content": row["prompt"]}
        out.append(
            {
                "prompt": row["prompt"],
                "prompt_id": str(i),
                "chosen": [user, {"role": "assistant", "content": row["chosen"].strip()}],
                "rejected": [user, {"role": "assistant", "content": row["rejected"].strip()}],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    return out


def test_string_prompt_dropped_only_next_to_conversations(recipe):
    plain = [json.loads(line) for line in TINY_DATA.read_text().splitlines()][:4]
    uf = Dataset.from_list(ultrafeedback_like(plain))
    assert "prompt" not in recipe.drop_redundant_prompt(uf).column_names
    assert recipe.drop_redundant_prompt(uf.remove_columns("prompt")).column_names == uf.column_names[1:]
    assert recipe.drop_redundant_prompt(Dataset.from_list(plain)).column_names == ["prompt", "chosen", "rejected"]
    explicit = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
        for r in ultrafeedback_like(plain)
    ]
    assert "prompt" in recipe.drop_redundant_prompt(Dataset.from_list(explicit)).column_names


def test_recipe_dpo_baseline_on_ultrafeedback_schema_from_disk(recipe, tiny_model, tmp_path, monkeypatch):
    rows = ultrafeedback_like([json.loads(line) for line in TINY_DATA.read_text().splitlines()][:16])
    DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:8])}).save_to_disk(
        str(tmp_path / "uf")
    )
    monkeypatch.chdir(REPO)
    argv = ["--config", str(CONFIGS / "tiny_cpu.yaml"), "--model_name_or_path", str(tiny_model)]
    argv += ["--dataset_name", str(tmp_path / "uf"), "--dataset_train_split", "train_prefs", "--method", "dpo"]
    argv += ["--dataset_test_split", "test_prefs", "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "2"]
    argv += ["--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]
    argv += ["--model_card_dataset_name", "HuggingFaceH4/ultrafeedback_binarized"]
    trainer = recipe.train(*recipe.parse_args(argv))
    assert trainer.train_reference_logps is not None and set(trainer.eval_reference_logps) == {"eval"}
    logs = trainer.state.log_history
    assert any("eval_u_fraction" in h for h in logs) and any("u_fraction" in h for h in logs)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Method: DPO baseline" in card and "cpo_gamma = 0" in card
    assert "per-token averaged log-probs (loss_type ['sigmoid_norm'])" in card and "length_normalize" not in card
    uf = "HuggingFaceH4/ultrafeedback_binarized"
    assert f"- Dataset: [{uf}](https://huggingface.co/datasets/{uf})" in card
    assert "Constrained Preference Optimization" in card and "| `beta` | `2.5` |" in card


# ----------------------------------------------------------------------------------------------------------------------
# Accelerate configs
# ----------------------------------------------------------------------------------------------------------------------


def launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` would give the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), str(RECIPE)])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    "name, distributed_type, num_processes, env",
    [
        ("single_gpu", "NO", 1, {}),
        ("multi_gpu", "MULTI_GPU", 8, {}),
        (
            "fsdp2",
            "FSDP",
            8,
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
                "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                "FSDP_RESHARD_AFTER_FORWARD": "true",
            },
        ),
        (
            "zero3",
            "DEEPSPEED",
            8,
            {
                "ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
                "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
            },
        ),
    ],
)
def test_accelerate_configs(name, distributed_type, num_processes, env):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] == distributed_type and raw["num_processes"] == num_processes
    assert raw["mixed_precision"] == "bf16" and raw["use_cpu"] is False
    if name == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2
    if name == "zero3":
        assert raw["deepspeed_config"]["zero_stage"] == 3
    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader accepts it
    assert config.distributed_type.value == distributed_type and config.num_processes == num_processes
    if env:
        launched = launch_env(path)
        assert launched["ACCELERATE_MIXED_PRECISION"] == "bf16"
        for key, value in env.items():
            assert launched.get(key) == value, key
