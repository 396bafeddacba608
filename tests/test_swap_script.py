"""The README's swap section for scripts shaped like TRL's `trl/scripts/dpo.py`.

Its claims, checked against TRL's own installed script: with `DPOConfig` in the `TrlParser` dataclasses, `--cpo_gamma`
is rejected and a `cpo_gamma:` YAML key is dropped without a word (TRL's script parses with
`fail_with_unknown_args=False`), so a swapped trainer would silently train at the default. Then the swapped script
the README shows (tests/scripts/dpo_cpo.py: `CPOConfig` in the parser, `CPOTrainer` as the trainer) is run as a
subprocess, once with `--cpo_gamma 0.2` and once with `cpo_gamma: 0.2` in its YAML config, and the trainer used 0.2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_pairs, subprocess_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "dpo_cpo.py"
CPO_GAMMA = 0.2  # the value the user asks for; the default is 0.05


def base_options(model_dir, data_dir, out) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data_dir),
        "output_dir": str(out),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "max_steps": 1,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def as_argv(options: dict) -> list[str]:
    return [
        item
        for key, value in options.items()
        for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    (path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in make_pairs(8)))
    return path


def test_readme_shows_the_swapped_lines_of_the_tested_script():
    readme = (REPO / "README.md").read_text()
    script = SCRIPT.read_text()
    added = [line[1:].strip() for line in readme.splitlines() if line.startswith("+    ")]
    assert added and all(line in script for line in added), added
    assert "dataclass_types = (ScriptArguments, CPOConfig, ModelConfig, DatasetMixtureConfig)" in added


def test_trl_dpo_script_rejects_the_flag_and_drops_the_yaml_key(tmp_path):
    """TRL's own `trl/scripts/dpo.py` parser (DPOConfig): what the README says happens without the swap."""
    from trl.scripts.dpo import make_parser

    options = {"output_dir": str(tmp_path), "use_cpu": True}
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--cpo_gamma', '0.2'\]"):
        make_parser().parse_args_and_config(
            [*as_argv(options), "--cpo_gamma", str(CPO_GAMMA)], fail_with_unknown_args=False
        )
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({**options, "cpo_gamma": CPO_GAMMA}))
    _, training_args, _, _ = make_parser().parse_args_and_config(
        ["--config", str(config)], fail_with_unknown_args=False
    )
    assert type(training_args).__name__ == "DPOConfig" and not hasattr(training_args, "cpo_gamma")  # silently gone


def run_script(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def trained_with(out: Path):
    args = torch.load(out / "training_args.bin", weights_only=False)  # what the trainer ran with
    return type(args).__name__, args.cpo_gamma


@pytest.mark.parametrize("source", ["flag", "yaml"])
def test_swapped_script_trains_with_the_users_cpo_gamma(source, model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    options = base_options(model_dir, data_dir, out)
    if source == "flag":
        run_script([*as_argv(options), "--cpo_gamma", str(CPO_GAMMA)])
    else:
        config = tmp_path / "cpo.yaml"
        config.write_text(yaml.safe_dump({**options, "cpo_gamma": CPO_GAMMA}))
        run_script(["--config", str(config)])
    assert trained_with(out) == ("CPOConfig", CPO_GAMMA)
