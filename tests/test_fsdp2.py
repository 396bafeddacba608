"""CPO, E-CPOC and the recipe's DPO baseline under real FSDP2 (PyTorch `fully_shard`) on two CPU processes.

accelerate 1.15 applies FSDP only for GPU-like distributed types: with `use_cpu=True`, `fsdp=True` silently becomes
DDP. `tests/scripts/fsdp2_harness.py` (test code, never imported by the package) does for `MULTI_CPU` what accelerate
does for `MULTI_GPU`, so the plugin that transformers' Trainer builds from `fsdp` / `fsdp_config` is really applied:
every parameter becomes a DTensor sharded over a 2-rank CPU mesh (gloo) and the model class `FSDPLlamaForCausalLM`.
Every run records that, and `test_runs_are_fsdp2_on_two_ranks` fails if a run fell back to DDP or to one process.

One `torchrun --nproc_per_node 2` launch of `tests/scripts/fsdp2_worker.py` runs, in order:
- CPO, E-CPOC and the DPO baseline, 3 optimizer steps each, saving a checkpoint after step 1 (CPO: FULL_STATE_DICT,
  E-CPOC and DPO: SHARDED_STATE_DICT);
- the same three runs resumed from those checkpoints;
- `recipes/cpo_llama3.py` (executed as `__main__`) on `recipes/configs/tiny_cpu.yaml` with the FSDP settings of
  `recipes/accelerate_configs/fsdp2.yaml`, twice: CPO with those settings translated into the recipe's
  `--fsdp --fsdp_config FILE` (`FSDP_KEYS` below), and the DPO baseline (`--method dpo`) under the environment that
  `accelerate launch --config_file fsdp2.yaml` gives the processes (derived by accelerate's own code), which is how
  the documented GPU command runs.
The training runs use the same FSDP settings (read from that yaml), except the state dict type that they vary, and
write per-pair files (issue 19) with `pair_diagnostics="eval"`: a no-grad pass over the eval set after each evaluation,
between training steps, and over the train and eval sets at the end of training. Everything the tests check about a
run's model (sharding, optimizer state, weights) is taken after that last pass.

The same three trainings run here in one process without FSDP. Both use fp32, SGD with momentum and a linear schedule,
the same global batch (2 x 4 vs 1 x 8 pairs) and the same data order, so FSDP2 must reproduce every logged metric, the
trained weights and the per-pair files up to float32 round-off. Mixed precision is off: bf16 FSDP2
(`MixedPrecisionPolicy`) differs from bf16 autocast from the first step, and the yaml's `mixed_precision: bf16` is a
GPU setting; it is not tested here.

Flakiness loop (issue 15): see tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import first_step_accuracy_is_roundoff, free_port, load_script, make_pairs, subprocess_env
from safetensors.torch import load_file

from trl_cpo.diagnostics import PAIR_COLUMNS, PAIRS_DIR, read_pairs
from trl_cpo.reference_store import REFERENCE_FILE
from trl_cpo.tiny import build_tiny_llama

#: Launches several processes: in the 20x loop of issue 15 (`pytest -m multiprocess`).
pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "scripts" / "fsdp2_worker.py"
FSDP2_YAML = REPO / "recipes" / "accelerate_configs" / "fsdp2.yaml"
TINY_CONFIG = REPO / "recipes" / "configs" / "tiny_cpu.yaml"

NUM_PAIRS = 24
NUM_EVAL_PAIRS = 8  # evaluated after every step
GLOBAL_BATCH = 8  # pairs per optimizer step, in both runs
STEPS = 3
SAVE_STEP = 1  # the checkpoint the resumed runs start from
LEARNING_RATE = 0.1  # SGD: large enough that the weights move by ~0.1 in 3 steps
# dpo: the recipe's DPOBaselineTrainer, imported in one place (fsdp2_worker.dpo_baseline_classes)
METHODS = ("cpo", "ecpoc", "dpo")
STATE_DICT_TYPE = {"cpo": "FULL_STATE_DICT", "ecpoc": "SHARDED_STATE_DICT", "dpo": "SHARDED_STATE_DICT"}
RUNS = [
    *({"name": m, "method": m, "state_dict_type": STATE_DICT_TYPE[m]} for m in METHODS),
    *({"name": f"{m}-resumed", "method": m, "state_dict_type": STATE_DICT_TYPE[m], "resume": m} for m in METHODS),
]
#: Recipe runs: name -> (method, how the FSDP settings reach it).
RECIPE_RUNS = {"recipe-flags": ("cpo", "flags"), "recipe-accelerate-env": ("dpo", "env")}
RECIPE_TRAINERS = {"cpo": "CPOTrainer", "dpo": "DPOBaselineTrainer"}

#: `fsdp_config` keys of an accelerate config file -> `TrainingArguments.fsdp_config` keys. transformers strips the
#: `fsdp_` prefix itself, so most keys pass through; accelerate's `fsdp_offload_params` is transformers' `cpu_offload`.
FSDP_KEYS = {
    "fsdp_version": "version",
    "fsdp_auto_wrap_policy": "auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
    "fsdp_reshard_after_forward": "reshard_after_forward",
    "fsdp_cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "fsdp_offload_params": "cpu_offload",
    "fsdp_state_dict_type": "state_dict_type",
    "fsdp_activation_checkpointing": "activation_checkpointing",
}
#: Logged by TRL as a running total since the trainer was built: a resumed trainer counts from zero again (TRL does
#: not checkpoint it, for DPOTrainer as for ours), so resumes are compared on its per-step increments.
RUNNING_TOTALS = ("num_tokens", "eval_num_tokens")  # the eval entry repeats the training count


def accelerate_fsdp_config() -> dict:
    return yaml.safe_load(FSDP2_YAML.read_text())


def trainer_fsdp_config() -> dict:
    """The yaml's `fsdp_config`, as the `TrainingArguments.fsdp_config` that gives the same plugin."""
    raw = accelerate_fsdp_config()["fsdp_config"]
    unknown = set(raw) - set(FSDP_KEYS)
    assert not unknown, f"{FSDP2_YAML.name} has fsdp_config keys this test does not translate: {sorted(unknown)}"
    return {FSDP_KEYS[key]: value for key, value in raw.items()}


def accelerate_launch_env() -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables `accelerate launch --config_file fsdp2.yaml` sets, for 2 CPU processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(FSDP2_YAML), "--num_processes", "2", "--mixed_precision", "no", "script.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def load_worker():
    spec = importlib.util.spec_from_file_location("fsdp2_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("fsdp2")
    build_tiny_llama(tokenizer, seed=0).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    for name, n, seed in (("pairs", NUM_PAIRS, 3), ("eval-pairs", NUM_EVAL_PAIRS, 4)):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in make_pairs(n, seed=seed))
    load_script("make_tiny_model", REPO / "recipes" / "make_tiny_model.py").build(root / "recipe-model")
    (root / "fsdp.json").write_text(json.dumps(trainer_fsdp_config()))
    recipe_runs = []
    for name, (method, how) in RECIPE_RUNS.items():
        argv = ["--config", str(TINY_CONFIG), "--model_name_or_path", str(root / "recipe-model")]
        argv += ["--output_dir", str(root / "world2" / name), "--method", method]
        argv += ["--bf16", "false"]  # fsdp2.yaml's mixed_precision: bf16 is a GPU setting (see the module docstring)
        if how == "flags":
            recipe_runs.append({"name": name, "recipe": [*argv, "--fsdp", "--fsdp_config", str(root / "fsdp.json")]})
        else:
            recipe_runs.append({"name": name, "recipe": argv, "env": accelerate_launch_env()})
    base = {
        "model_dir": str(root / "policy"),
        "data_jsonl": str(root / "pairs.jsonl"),
        "eval_jsonl": str(root / "eval-pairs.jsonl"),
        "global_batch": GLOBAL_BATCH,
        "steps": STEPS,
        "save_step": SAVE_STEP,
        "learning_rate": LEARNING_RATE,
        "fsdp_config": trainer_fsdp_config(),
        "runs": [*RUNS, *recipe_runs],
    }
    out = {world: root / f"world{world}" for world in (2, 1)}
    for folder in out.values():
        folder.mkdir()
    (root / "spec2.json").write_text(json.dumps({**base, "out_dir": str(out[2])}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(root / "spec2.json")],
        cwd=REPO,  # tiny_cpu.yaml's data path is relative to the repo root
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    # The 1-process runs (no FSDP: the worker only enables it for more than one process), in this process.
    load_worker().run({**base, "out_dir": str(out[1])})

    def load(world, name, rank=0):
        return json.loads((out[world] / f"{name}.rank{rank}.json").read_text())

    return {"load": load, "out": out, "root": root}


def steps_logged(result):
    """The per-step log entries: training metrics ("loss", ...) and evaluation metrics ("eval_loss", ...)."""
    return [entry for entry in result["log_history"] if "loss" in entry or "eval_loss" in entry]


def compared(entry):
    """The metrics of a log entry, without wall-clock timings."""
    return {k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))}


def test_fsdp_settings_come_from_the_accelerate_config():
    config = accelerate_fsdp_config()
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert trainer_fsdp_config()["version"] == 2
    # Set on the command line in `runs`: a GPU setting, off on CPU.
    assert config["mixed_precision"] == "bf16"


def test_documented_fsdp_json_matches_the_accelerate_config():
    page = (REPO / "docs" / "recipes.md").read_text()
    (block,) = re.findall(r"^```json\n(.*?)^```", page, flags=re.MULTILINE | re.DOTALL)
    assert json.loads(block) == trainer_fsdp_config()


def test_runs_are_fsdp2_on_two_ranks(runs):
    settings = trainer_fsdp_config()
    layers = json.loads((runs["root"] / "policy" / "config.json").read_text())["num_hidden_layers"]
    recipe_runs = [{"name": name, "state_dict_type": settings["state_dict_type"]} for name in RECIPE_RUNS]
    for run in [*RUNS, *recipe_runs]:
        facts = [runs["load"](2, run["name"], rank) for rank in (0, 1)]
        assert [f["process_index"] for f in facts] == [0, 1], run["name"]
        for f in facts:
            assert f["num_processes"] == 2, run["name"]
            assert f["distributed_type"] == "DistributedType.FSDP" and f["is_fsdp_enabled"], run["name"]
            assert f["fsdp_version"] == 2
            assert f["model_class"] == "FSDPLlamaForCausalLM"
            # fully_shard on the root and, per TRANSFORMER_BASED_WRAP / LlamaDecoderLayer, on every decoder layer
            # (accelerate also gives the embedding and the final norm + LM head their own groups)
            assert "FSDPLlamaForCausalLM" in f["fsdp_modules"]
            assert f["fsdp_modules"].count("FSDPLlamaDecoderLayer") == layers
            # every parameter a DTensor, sharded on dim 0 over the 2-rank CPU mesh, after the per-pair pass too (its
            # no-grad forwards leave the groups FSDP2 does not reshard after forward unsharded until resharded)
            assert f["num_parameters"] > 0
            assert f["num_dtensor_parameters"] == f["num_sharded_parameters"] == f["num_parameters"], run["name"]
            assert f["meshes"] == [["cpu", 2]]
            assert f["fsdp_plugin"] == {
                "state_dict_type": run["state_dict_type"],
                "reshard_after_forward": settings["reshard_after_forward"],
                "cpu_ram_efficient_loading": settings["cpu_ram_efficient_loading"],
                "activation_checkpointing": settings["activation_checkpointing"],
                "offload_policy": "CPUOffloadPolicy" if settings["cpu_offload"] else "OffloadPolicy",
                "mixed_precision_policy": None,
            }
        assert facts[0]["global_numel"] == facts[1]["global_numel"]
        assert facts[0]["local_numel"] + facts[1]["local_numel"] == facts[0]["global_numel"], "shards must partition"
    for method in METHODS:
        single = runs["load"](1, method)
        assert single["num_processes"] == 1 and "distributed_type" not in single


@pytest.mark.parametrize("method", METHODS)
def test_reference_precompute_matches_one_process(runs, method):
    # Under FSDP, TRL loads a reference copy, shards it (prepare_fsdp) and frees it after the precompute; our
    # precompute gathers its per-pair results so that every rank holds all of them, in dataset order.
    for split, n in (("reference", NUM_PAIRS), ("eval_reference", NUM_EVAL_PAIRS)):
        single = runs["load"](1, method)[split]
        for rank in (0, 1):
            reference = runs["load"](2, method, rank)[split]
            for key in ("chosen", "rejected"):
                assert len(reference[key]) == n
                torch.testing.assert_close(
                    torch.tensor(reference[key]), torch.tensor(single[key]), rtol=1e-5, atol=1e-5, msg=f"{split} {key}"
                )


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_training_matches_one_process(runs, method):
    one, two = runs["load"](1, method), runs["load"](2, method)
    assert one["trainer_class"] == two["trainer_class"]
    assert one["global_step"] == two["global_step"] == STEPS
    one_steps, two_steps = steps_logged(one), steps_logged(two)
    assert len(one_steps) == len(two_steps) == 2 * STEPS  # a training entry and an evaluation entry per step
    for a, b in zip(one_steps, two_steps, strict=True):
        a, b = compared(a), compared(b)
        assert a.keys() == b.keys(), f"step {a['step']}: logged metrics differ: {sorted(a.keys() ^ b.keys())}"
        for key, value in a.items():
            if "loss" in a and first_step_accuracy_is_roundoff(a["step"] - 1, key, a, b):
                continue
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-5), f"step {a['step']}: {key}"
    train_losses = [entry["loss"] for entry in two_steps if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in two_steps if "eval_loss" in entry]
    assert train_losses[-1] < train_losses[0] and eval_losses[-1] != eval_losses[0]
    one_weights = load_file(str(runs["out"][1] / f"{method}.safetensors"))
    two_weights = load_file(str(runs["out"][2] / f"{method}.safetensors"))
    start = load_file(str(runs["root"] / "policy" / "model.safetensors"))
    assert one_weights.keys() == two_weights.keys() == start.keys()
    for key, value in one_weights.items():
        torch.testing.assert_close(two_weights[key], value, rtol=0, atol=1e-5, msg=key)
    moved = max((value - start[key]).abs().max().item() for key, value in one_weights.items())
    assert moved > 1e-2, "training did not change the weights"


#: The per-pair files of a run: the end of training's, then the eval set's after each evaluation.
PAIR_FILES = {
    "train": NUM_PAIRS,
    "eval": NUM_EVAL_PAIRS,
    **{f"step-{s}/eval": NUM_EVAL_PAIRS for s in range(1, STEPS + 1)},
}


def pair_files(runs, world, name, split):
    return read_pairs(str(runs["out"][world] / name / PAIRS_DIR / f"{split}.jsonl"))


@pytest.mark.parametrize("method", METHODS)
def test_per_pair_files_match_one_process(runs, method):
    # Under FSDP2 both ranks run each pass and rank 0 writes its file: one row per pair, with the values of the
    # 1-process run's file at the same weights (between steps, and final). `row` is numbered by the trainer, so the
    # row-by-row comparison of values is what checks that the pairs gathered from both ranks are in dataset order.
    for split, n in PAIR_FILES.items():
        one, two = (pair_files(runs, world, method, split) for world in (1, 2))
        assert [pair["row"] for pair in two] == [pair["row"] for pair in one] == list(range(n)), split
        for a, b in zip(one, two, strict=True):
            assert list(a) == list(b) == list(PAIR_COLUMNS)
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-5), f"{split} row {a['row']}: {key}"
                else:  # token counts and flags
                    assert b[key] == value, f"{split} row {a['row']}: {key}"
        # The policy's log-probs at the pass's (trained) weights, not the reference's
        assert max(abs(pair["delta_pi"] - pair["delta_ref"]) for pair in two) > 1e-2, split
    # Every rank gathered every pair: rank 1's summary of each split is rank 0's.
    summaries = [runs["load"](2, method, rank)["pair_summary"] for rank in (0, 1)]
    assert summaries[0] == summaries[1] and set(summaries[0]) == {"train", "eval"}
    assert summaries[0]["train"]["num_pairs"] == NUM_PAIRS


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_state_dict_after_the_pair_pass(runs, method):
    # Recorded after train() (so after the per-pair pass) and before anything took the model's state dict, whose
    # FSDP2 hooks reshard: torch.distributed.checkpoint maps the optimizer's state to each parameter by name. With the
    # final norm and LM head left unsharded by the pass's forwards, it failed with a KeyError (issue 19).
    names = sorted(load_file(str(runs["root"] / "policy" / "model.safetensors")))
    for rank in (0, 1):
        assert runs["load"](2, method, rank)["optimizer_state"] == names, f"rank {rank}"


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_is_saved(runs, method):
    folder = runs["out"][2] / method / f"checkpoint-{SAVE_STEP}"
    # The one we asked for, and the Trainer's own at the end of training.
    checkpoints = sorted(p.name for p in (runs["out"][2] / method).glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{SAVE_STEP}", f"checkpoint-{STEPS}"]
    files = {p.name for p in folder.iterdir()}
    assert {REFERENCE_FILE, "scheduler.pt", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= files
    # The reference log-probs the run trained against, for a resume that trains against the same margins.
    saved = load_file(str(folder / REFERENCE_FILE))
    reference = runs["load"](2, method)["reference"]
    torch.testing.assert_close(saved["0.chosen"], torch.tensor(reference["chosen"]))
    start = load_file(str(runs["root"] / "policy" / "model.safetensors"))
    if STATE_DICT_TYPE[method] == "FULL_STATE_DICT":
        # Ordinary full weights (what save_model writes), plus accelerate's full model and optimizer files.
        assert {"model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin"} <= files
        weights = load_file(str(folder / "model.safetensors"))
        assert weights.keys() == start.keys()
        assert all(weights[k].shape == start[k].shape for k in start)
        assert any(not torch.equal(weights[k], start[k]) for k in start), "the checkpoint holds the untrained model"
        final = load_file(str(runs["out"][2] / method / f"checkpoint-{STEPS}" / "model.safetensors"))
        trained = load_file(str(runs["out"][2] / f"{method}.safetensors"))
        assert all(torch.equal(final[k], trained[k]) for k in trained), "the last checkpoint is not the trained model"
    else:
        # One torch.distributed.checkpoint shard per rank for the model and for the optimizer, no full weights.
        assert "model.safetensors" not in files
        for name in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (folder / name).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical(runs, method):
    full, resumed = runs["load"](2, method), runs["load"](2, f"{method}-resumed")
    assert resumed["steps_this_session"] == STEPS - SAVE_STEP and resumed["global_step"] == STEPS
    # The log history up to the checkpoint comes from the checkpoint; the rest was logged by the resumed run.
    full_steps, resumed_steps = map(steps_logged, (full, resumed))
    assert [e["step"] for e in resumed_steps] == [e["step"] for e in full_steps]
    assert [e["step"] for e in full_steps] == [step for step in range(1, STEPS + 1) for _ in range(2)]
    previous = {}
    for a, b in zip(map(compared, full_steps), map(compared, resumed_steps), strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(RUNNING_TOTALS):
            assert b[key] == a[key], f"step {a['step']}: {key}"
        for key in set(RUNNING_TOTALS) & a.keys():
            if a["step"] > SAVE_STEP + 1:  # the first resumed step counts from zero
                assert b[key] - previous[key][1] == a[key] - previous[key][0], key
            previous[key] = (a[key], b[key])
    full_weights = load_file(str(runs["out"][2] / f"{method}.safetensors"))
    resumed_weights = load_file(str(runs["out"][2] / f"{method}-resumed.safetensors"))
    assert full_weights.keys() == resumed_weights.keys()
    for key, value in full_weights.items():
        assert torch.equal(resumed_weights[key], value), key
    for split in PAIR_FILES:  # the per-pair passes of the same weights, after the checkpoint
        if split != f"step-{SAVE_STEP}/eval":
            assert pair_files(runs, 2, f"{method}-resumed", split) == pair_files(runs, 2, method, split), split


@pytest.mark.parametrize("name", RECIPE_RUNS)
def test_recipe_runs_under_fsdp2(runs, name):
    from transformers import AutoModelForCausalLM

    method, _ = RECIPE_RUNS[name]
    assert runs["load"](2, name)["trainer_class"] == RECIPE_TRAINERS[method]
    out = runs["out"][2] / name
    results = json.loads((out / "train_results.json").read_text())
    assert results["num_processes"] == 2 and results["train_samples"] == 64
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == state["global_step"] > 1
    assert torch.isfinite(torch.tensor([entry["loss"] for entry in steps])).all()
    # Before the first update the policy is the reference on every pair, both ranks' halves included: the sharded
    # reference copy TRL loads for the precompute (with fsdp2.yaml's cpu_ram_efficient_loading) is the right model.
    assert steps[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert steps[0]["rewards/rejected"] == pytest.approx(0, abs=1e-5)
    # The per-pair pass ran at the end of training (pair_diagnostics="end", the default), before the recipe's
    # save_model: the model checked below was saved after it.
    pairs = read_pairs(str(out / PAIRS_DIR / "train.jsonl"))
    assert [pair["row"] for pair in pairs] == list(range(results["train_samples"]))
    # FULL_STATE_DICT (fsdp2.yaml): save_model writes an ordinary full model that loads without FSDP.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(runs["root"] / "recipe-model", dtype=torch.float32)
    trained, initial = model.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial), "the saved model is the untrained one"
    card = (out / "README.md").read_text()
    assert ("## Method: DPO baseline" in card) == (method == "dpo")
