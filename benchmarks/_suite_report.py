"""The GPU suite's report: its Markdown table and the package versions it records (benchmarks/gpu_suite.py)."""

from __future__ import annotations

PARTS = ("step_time", "step_time_qlora", "qlora_lora_weights_move", "recipe_fsdp2", "recipe_zero3")
SMOKE_LABEL = "CPU smoke run (--smoke): not GPU results"
GPU_LABEL = "GPU run"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    out["trl-cpo"] = _trl_cpo_version()
    return out


def _trl_cpo_version():
    try:
        from importlib.metadata import version

        return version("trl-cpo")
    except Exception:
        return None


def markdown(result: dict) -> str:
    smoke = result["kind"] == "cpu_smoke"
    unit = " (CPU smoke)" if smoke else ""
    lines = ["# trl-cpo GPU suite", ""]
    if smoke:
        lines += [
            f"**{SMOKE_LABEL}.** Every number below is a CPU smoke value from tiny shapes; it shows that the "
            "code paths run, and says nothing about GPU speed or memory.",
            "",
        ]
    lines += [
        f"Device: {result['device_name']} (`{result['device']}`); date: {result['date']}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
        "",
    ]
    lines += ["| part | status | details |", "| --- | --- | --- |"]
    for name in PARTS:
        part = result["parts"].get(name)
        if part is None:
            lines.append(f"| {name} | not run in this invocation | |")
            continue
        status = part["status"] if part["status"] != "skipped" else f"skipped: {part['reason']}"
        lines.append(f"| {name} | {status} | {_details(name, part)} |")
    for name in ("step_time", "step_time_qlora"):
        part = result["parts"].get(name)
        if not part or part["status"] != "passed":
            continue
        c = part["config"]
        lines += [
            "",
            f"## {name}{unit}",
            "",
            f"shape {c['shape']} ({c['layers']} layers), {c['dtype']}, 4-bit "
            f"{c['load_in_4bit']}, LoRA {c['lora']}, {c['per_device_train_batch_size']} pairs x {c['seq']} "
            f"tokens per step, {c['rounds']} rounds x {c['steps']} timed steps; memory: {c['memory']}.",
            "",
            f"| trainer | step s{unit} | tokens/s{unit} | peak MiB{unit} | time / DPO precomputed{unit} | "
            f"time / DPO live{unit} | mem / DPO precomputed{unit} | mem / DPO live{unit} |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for trainer, s in part["trainers"].items():
            lines.append(
                f"| {trainer} | {s['median_step_s']:.4f} | {s['tokens_per_s']:.1f} | {s['peak_mem_mib']:.1f} | "
                f"{s['time_vs_dpo_precomp']:.3f} | {s['time_vs_dpo_live']:.3f} | {_ratio(s['mem_vs_dpo_precomp'])} | "
                f"{_ratio(s['mem_vs_dpo_live'])} |"
            )
    return "\n".join(lines) + "\n"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _details(name: str, part: dict) -> str:
    if part["status"] == "skipped":
        return ""
    if "error" in part:
        return f"error: {part['error'].splitlines()[-1][:200]}"
    if name.startswith("step_time"):
        t = part["trainers"]
        return ", ".join(
            f"{k} {v['time_vs_dpo_precomp']:.3f}x DPO-precomputed time" for k, v in t.items() if k in ("cpo", "ecpoc")
        )
    if name == "qlora_lora_weights_move":
        return (
            f"{part['lora_tensors_moved']}/{part['lora_tensors']} LoRA tensors moved, "
            f"{len(part['base_tensors_changed'])} base tensors changed, {part['linear4bit_modules']} Linear4bit"
        )
    if name.startswith("recipe"):
        return f"exit {part['returncode']}, {part['wall_s']:.0f}s, losses {[round(x, 4) for x in part['losses']]}"
    return ""
