"""One GPU suite for trl-cpo, also runnable tiny on CPU (`--smoke`), writing one JSON and one Markdown table.

Parts (each recorded as passed, failed or skipped with the reason; a part is never silently missing):

  step_time                CPO / E-CPOC against DPO with a precomputed and with a live reference: step time, tokens/s
                           and peak memory (benchmarks/step_time.py's machinery, imported). GPU: a randomly
                           initialised Llama-3-8B-shaped model in bf16 with gradient checkpointing (all 32 layers on a
                           GPU with >= 100 GiB, else 16 of them so that DPO's live reference copy fits next to the full
                           training state; `--num_layers` overrides). --smoke: step_time.py --smoke.
  step_time_qlora          the same comparison with the base in 4-bit NF4 plus LoRA (reference = adapter-free base).
                           GPU only: it times bitsandbytes' 4-bit CUDA kernels.
  qlora_lora_weights_move  QLoRA training (4-bit NF4 base + LoRA on all linear layers, CPOTrainer, 3 steps) checking
                           that every LoRA weight tensor moved and no base weight did. GPU: Llama-3-8B's layer shape
                           and vocabulary with 2 layers, bf16 compute; --smoke: bitsandbytes' CPU 4-bit path, fp32.
  recipe_fsdp2             `accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml --num_processes 1
                           recipes/cpo_llama3.py --config recipes/configs/tiny_cpu.yaml` on one GPU (a local random
                           Llama, the shipped tiny pairs, bf16, a few steps): exit status, saved weights, finite logged
                           losses. Needs CUDA (accelerate applies FSDP only to GPU-like devices).
  recipe_zero3             the same with recipes/accelerate_configs/zero3.yaml (DeepSpeed ZeRO-3), if `import
                           deepspeed` works. Needs CUDA.

  python benchmarks/gpu_suite.py                                  # on a GPU: benchmarks/results/gpu_suite/
  python benchmarks/gpu_suite.py --parts step_time step_time_qlora --update   # a subset, merged into the same JSON
  python benchmarks/gpu_suite.py --smoke                          # CPU smoke run (what CI runs), to a temp dir

A --smoke run (`--tiny` is the same flag) stays on the CPU; its numbers are CPU smoke values that show the code paths
work, never GPU results: its JSON says `"kind": "cpu_smoke"` and `"device": "cpu"`, and its Markdown opens with "CPU
smoke run (--smoke): not GPU results". It writes to a new temporary directory unless `--output_dir` is given, and
never under benchmarks/results/.
`--parts ... --update` splits a GPU run over several sessions (how long each part takes on a GPU is
not known yet: the suite has not run on one).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _smoke
from _suite_report import GPU_LABEL, PARTS, SMOKE_LABEL, markdown, versions

import trl_cpo  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel probe before transformers runs it)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NEEDS_CUDA = "needs CUDA"


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke",
        "--tiny",
        action="store_true",
        dest="smoke",
        help="CPU smoke run with tiny shapes, not a measurement",
    )
    parser.add_argument("--output_dir", help="default: benchmarks/results/gpu_suite (a new temp dir with --smoke)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--update", action="store_true", help="merge into an existing gpu_suite.json (same device)")
    parser.add_argument("--num_layers", type=int, help="layers of the 8B-shaped bf16 step-time model (GPU)")
    parser.add_argument("--rounds", type=int, help="step-time rounds (default 3 on GPU, 1 with --smoke)")
    parser.add_argument("--recipe_max_steps", type=int, default=3)
    return parser.parse_args(argv)


def _load(name: str, path: Path):
    """Import a script that is not in a package (benchmarks/step_time.py, recipes/make_tiny_model.py) by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def step_time_module():
    return _load("step_time", HERE / "step_time.py")


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


# ----------------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------------


def part_step_time(args, cuda: bool, qlora: bool) -> dict:
    """CPO / E-CPOC vs DPO (precomputed, live reference) through benchmarks/step_time.py."""
    import torch

    st = step_time_module()
    if qlora and not cuda:
        return _skipped(
            f"{NEEDS_CUDA}: it times bitsandbytes' 4-bit CUDA kernels (the CPU 4-bit path is exercised by "
            "qlora_lora_weights_move)"
        )
    if args.smoke:
        flags = ["--smoke", "--rounds", str(args.rounds or 1)]
    else:
        flags = ["--shape", "llama3-8b", "--dtype", "bf16", "--per_device_train_batch_size", "2", "--seq", "1024"]
        flags += ["--steps", "8", "--warmup", "2", "--rounds", str(args.rounds or 3), "--gradient_checkpointing"]
        if qlora:
            flags += ["--load_in_4bit", "--lora"]
        else:
            total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            flags += ["--num_layers", str(args.num_layers or (32 if total_gib >= 100 else 16))]
    st_args = st._parse(flags)
    # --smoke: trainers run in this process (the interpreter start-up would dominate a subprocess per trainer), so its
    # memory column is this process's RSS growth, not a per-trainer peak.
    runs = st.measure(st_args, in_process=args.smoke)
    summary = st.summarize(runs)
    mem_key = "peak_gpu_mib" if cuda else "peak_rss_over_baseline_mib"
    trainers = {}
    for name, s in summary.items():
        trainers[name] = {
            "median_step_s": s["median_step_s"],
            "tokens_per_s": s["tokens_per_s"],
            "peak_mem_mib": s[mem_key],
            "time_vs_dpo_precomp": s["median_step_s"] / summary["dpo_precomp"]["median_step_s"],
            "time_vs_dpo_live": s["median_step_s"] / summary["dpo_live"]["median_step_s"],
            # In-process (CPU smoke) memory is the whole process's growth so far: no per-trainer ratio exists.
            "mem_vs_dpo_precomp": s[mem_key] / summary["dpo_precomp"][mem_key] if cuda else None,
            "mem_vs_dpo_live": s[mem_key] / summary["dpo_live"][mem_key] if cuda else None,
        }
    config = {k: v for k, v in vars(st_args).items() if k not in ("json", "child", "workdir")}
    config["memory"] = (
        "peak GPU memory allocated while training (torch.cuda.max_memory_allocated), one fresh process per trainer"
        if cuda
        else "peak RSS growth of the suite's own process (trainers run in-process): not a per-trainer figure"
    )
    config["layers"] = st_args.num_layers or st.SHAPES[st_args.shape][1]
    return {"status": "passed", "config": config, "trainers": trainers, "runs": runs}


def _random_pairs(words: list[str], n: int, seed: int, prompt_len: int, completion_len: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choices(words, k=prompt_len)),
            "chosen": " " + " ".join(rng.choices(words, k=completion_len)),
            "rejected": " " + " ".join(rng.choices(words, k=max(1, completion_len - rng.randint(0, 3)))),
        }
        for _ in range(n)
    ]


def part_qlora_check(args, cuda: bool, workdir: str) -> dict:
    """Train 3 QLoRA steps and check that every LoRA tensor moved and that no base weight did."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return _skipped("bitsandbytes is not installed (pip install 'trl-cpo[quantization]')")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_cpo import CPOConfig, CPOTrainer
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    st = step_time_module()
    words = [f"w{i}" for i in range(500)]
    tokenizer = build_tiny_tokenizer(words)
    if args.smoke:
        shape, num_layers, dtype, seq = "tiny", 2, torch.float32, 16
    else:
        shape, num_layers, dtype, seq = "llama3-8b", 2, torch.bfloat16, 128
    hidden, _, heads, kv_heads, intermediate, vocab = st.SHAPES[shape]
    model_dir = os.path.join(workdir, "qlora-model")
    build_tiny_llama(
        tokenizer,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
    ).to(dtype).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=dtype, device_map={"": 0} if cuda else None
    )
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps = 3
    config = CPOConfig(
        output_dir=os.path.join(workdir, "qlora-out"),
        report_to="none",
        use_cpu=not cuda,
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        max_steps=steps,
        # Large enough that a step changes bf16 adapter weights (~1.6e-2 at init, bf16 spacing ~6e-5 there).
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        max_length=2 * seq + 8,
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list(_random_pairs(words, 2 * steps, seed=0, prompt_len=seq, completion_len=seq))
    trainer = CPOTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    lora_before = {k: v.detach().float().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    trainer.train()
    lora_after = {k: v.detach().float() for k, v in trainer.model.named_parameters() if "lora_" in k}
    not_moved = [k for k, v in lora_before.items() if torch.equal(v, lora_after[k])]
    changed_share = [(lora_after[k] != v).float().mean().item() for k, v in lora_before.items()]
    base_after = {
        k.replace(".base_layer", ""): v
        for k, v in trainer.model.get_base_model().state_dict().items()
        if "lora_" not in k
    }
    # Compared in the dtype they had before training: a lossless upcast of a frozen tensor is not a change.
    base_changed = [
        k
        for k, v in base_before.items()
        if k not in base_after or not torch.equal(base_after[k].to(device=v.device, dtype=v.dtype), v)
    ]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    quantized = sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    passed = bool(lora_before) and not not_moved and not base_changed and quantized > 0
    passed = passed and len(losses) == steps and all(math.isfinite(x) for x in losses)
    return {
        "status": "passed" if passed else "failed",
        "config": {
            "shape": shape,
            "layers": num_layers,
            "compute_dtype": str(dtype).replace("torch.", ""),
            "lora": "r 8, alpha 16, all linear layers",
            "steps": steps,
            "learning_rate": config.learning_rate,
        },
        "linear4bit_modules": quantized,
        "lora_tensors": len(lora_before),
        "lora_tensors_moved": len(lora_before) - len(not_moved),
        "lora_tensors_not_moved": not_moved,
        "min_share_of_elements_changed": min(changed_share) if changed_share else 0.0,
        "base_tensors_changed": base_changed,
        "losses": losses,
    }


def part_recipe(args, cuda: bool, workdir: str, name: str) -> dict:
    """The recipe under an accelerate config on one GPU, a few steps on a local random Llama and the shipped pairs."""
    accelerate_config = {"recipe_fsdp2": "fsdp2.yaml", "recipe_zero3": "zero3.yaml"}[name]
    if not cuda:
        why = "accelerate applies FSDP only to GPU-like devices" if name == "recipe_fsdp2" else "DeepSpeed ZeRO-3"
        return _skipped(f"{NEEDS_CUDA} ({why})")
    if name == "recipe_zero3":
        try:
            import deepspeed  # noqa: F401
        except Exception as error:  # ImportError, or a DeepSpeed build that fails to import
            return _skipped(f"deepspeed is not importable ({type(error).__name__}: {error}); pip install deepspeed")
    make_tiny_model = _load("make_tiny_model", REPO / "recipes" / "make_tiny_model.py")
    model_dir = os.path.join(workdir, "recipe-model")
    if not os.path.isdir(model_dir):
        make_tiny_model.build(model_dir, hidden_size=512, num_layers=4)
    out_dir = os.path.join(workdir, f"out-{name}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(REPO / "recipes" / "accelerate_configs" / accelerate_config), "--num_processes", "1"]
    cmd += [str(REPO / "recipes" / "cpo_llama3.py"), "--config", str(REPO / "recipes" / "configs" / "tiny_cpu.yaml")]
    overrides = {
        "model_name_or_path": model_dir,
        "output_dir": out_dir,
        "max_steps": str(args.recipe_max_steps),
        "use_cpu": "false",
        "bf16": "true",
        "dataset_name": str(REPO / "recipes" / "data" / "tiny_prefs.jsonl"),
    }
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=1800)
    wall = time.perf_counter() - start
    state_file = os.path.join(out_dir, "trainer_state.json")
    losses = []
    if os.path.exists(state_file):
        with open(state_file) as f:
            losses = [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]
    weights = os.path.exists(os.path.join(out_dir, "model.safetensors"))
    passed = proc.returncode == 0 and weights and len(losses) == args.recipe_max_steps
    passed = passed and all(math.isfinite(x) for x in losses)
    command = " ".join(c if c != sys.executable else "python" for c in cmd)
    return {
        "status": "passed" if passed else "failed",
        "command": command,
        "returncode": proc.returncode,
        "wall_s": wall,
        "saved_weights": weights,
        "losses": losses,
        "output_tail": (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]) if not passed else "",
    }


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = _parse(argv)
    if args.smoke:
        # A smoke run stays on the CPU even on a GPU machine (the step-time children pick CUDA when they see it).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        _smoke.start(args.output_dir)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not args.smoke and not cuda:
        sys.exit("No CUDA device: this suite measures GPUs. Run with --smoke for the CPU smoke run.")
    if args.smoke:
        output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="gpu-suite-smoke-"))
    else:
        output_dir = Path(args.output_dir or HERE / "results" / "gpu_suite")
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "gpu_suite.json"
    st = step_time_module()
    device_name = torch.cuda.get_device_name(0) if cuda else st.device_name()
    result = {
        "suite": "trl-cpo benchmarks/gpu_suite.py",
        "kind": "cpu_smoke" if args.smoke else "gpu",
        "label": SMOKE_LABEL if args.smoke else GPU_LABEL,
        "device": "cuda" if cuda else "cpu",
        "device_name": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "parts": {},
    }
    if args.update and json_path.exists():
        previous = json.loads(json_path.read_text())
        if (previous["kind"], previous["device_name"]) != (result["kind"], device_name):
            sys.exit(f"{json_path} holds a {previous['kind']} run on {previous['device_name']}: not merging into it")
        result["parts"] = previous["parts"]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.parts:
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            try:
                if name in ("step_time", "step_time_qlora"):
                    part = part_step_time(args, cuda, qlora=name == "step_time_qlora")
                elif name == "qlora_lora_weights_move":
                    part = part_qlora_check(args, cuda, workdir)
                else:
                    part = part_recipe(args, cuda, workdir, name)
            except Exception:
                part = {"status": "failed", "error": traceback.format_exc()[-4000:]}
            part["kind"] = result["kind"]
            part["elapsed_s"] = time.perf_counter() - start
            result["parts"][name] = part
            print(f"== {name}: {part['status']}" + (f" ({part['reason']})" if "reason" in part else ""), flush=True)
            if "error" in part:
                print(part["error"], file=sys.stderr)
    json_path.write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (output_dir / "gpu_suite.md").write_text(table)
    print(f"\n{table}\n{result['label']}: wrote {json_path} and {output_dir / 'gpu_suite.md'}")
    if args.smoke:
        print(_smoke.banner())
    return 1 if any(p["status"] == "failed" for p in result["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
