"""The `trl-cpo` command line: light and fast at the top, each subcommand its `trl_cpo.scripts` module's `main(argv)`.

`trl-cpo --help` and `import trl_cpo` run in fresh interpreters (this process has torch loaded already): neither may
import torch, transformers or bitsandbytes, nor print a bitsandbytes or kernels line
(tests/test_bnb_log.py covers bitsandbytes' import-time kernel probe).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import subprocess_env

from trl_cpo import cli

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl.trainer", "peft", "bitsandbytes", "matplotlib")


def fresh_python(code: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    return proc, time.perf_counter() - start


def loaded_after(statement: str) -> tuple[list[str], subprocess.CompletedProcess, float]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc, seconds = fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc, seconds


def test_help_imports_nothing_heavy_and_is_fast():
    statement = (
        "from trl_cpo.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0"
    )
    loaded, proc, seconds = loaded_after(statement)
    assert loaded == []
    assert "bitsandbytes" not in proc.stderr and "gemm_4bit" not in proc.stderr and proc.stderr == ""
    for command in cli.COMMANDS:
        assert f"    {command} " in proc.stdout
    # Measured ~0.2 s on 2 shared cores (it was ~11 s when the CLI imported the trainers); generous for a busy CI.
    assert seconds < 10, f"trl-cpo --help took {seconds:.1f} s"


def test_import_trl_cpo_is_light_and_silent():
    loaded, proc, _ = loaded_after("import trl_cpo")
    assert loaded == [] and proc.stderr == ""
    # The public names resolve on first use (PEP 562), to the submodules' objects.
    import trl_cpo
    from trl_cpo.cpo_trainer import CPOTrainer

    assert trl_cpo.CPOTrainer is CPOTrainer and set(trl_cpo.__all__) <= set(dir(trl_cpo))
    with pytest.raises(AttributeError, match="no attribute 'CPOTrainr'"):
        trl_cpo.CPOTrainr  # noqa: B018


def test_console_script_points_at_the_cli():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\ntrl-cpo = "trl_cpo.cli:main"\n' in pyproject


def test_no_command_prints_help_and_an_unknown_one_fails(capsys):
    assert cli.main([]) == 0
    assert "usage: trl-cpo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        cli.main(["trian"])
    assert error.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_maps_to_its_scripts_module(command, monkeypatch):
    import importlib

    module = importlib.import_module(cli.COMMANDS[command][0])
    assert module.__name__ == f"trl_cpo.scripts.{command}"
    seen = []
    monkeypatch.setattr(module, "main", lambda argv=None: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["trl-cpo"])
    assert cli.main([command, "--config", "x.yaml", "--help"]) == 0
    assert seen == [["--config", "x.yaml", "--help"]]
    assert sys.argv[0] == f"trl-cpo {command}"  # the command's usage line names it so


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_command_help(command, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["trl-cpo"])
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: trl-cpo {command}")
    if command == "train":
        for flag in (
            "--method",
            "--cpo_gamma",
            "--ecpoc_tau",
            "--cpo_auto_gamma",
            "--config FILE.yaml",
            "--hub_dry_run",
        ):
            assert flag in out, flag
        assert "--base_model_id" in out and "--model_card_license" in out


def test_train_command_runs_the_recipe_config(monkeypatch, tmp_path):
    import torch
    from helpers import load_script

    model = load_script("make_tiny_model", REPO / "recipes" / "make_tiny_model.py").build(tmp_path / "tiny-llama")
    monkeypatch.chdir(REPO)  # the config's data path is relative to the repo root
    monkeypatch.setattr(sys, "argv", ["trl-cpo"])
    out = tmp_path / "out"
    argv = ["train", "--config", "recipes/configs/tiny_cpu.yaml", "--model_name_or_path", str(model)]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--method", "ecpoc", "--disable_tqdm", "true"]
    assert cli.main(argv) == 0
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert type(args).__name__ == "ECPOCConfig" and args.max_steps == 1
    assert (out / "model.safetensors").is_file()
    assert "### Method: E-CPOC" in (out / "README.md").read_text()
