"""Worker for tests/test_resume.py's kill test: train CPO, block at a chosen point of a checkpoint save, resume.

    python resume_worker.py SPEC.json RUN_DIR:POINT...

Imports the libraries once, then forks one child process per RUN_DIR that trains and blocks at POINT of the save of
checkpoint-<kill_step>: it writes `RUN_DIR.blocked` (its pid) and sleeps until the test kills it with SIGKILL. (Forking
after the imports spares each child the several seconds of importing torch, transformers and TRL; nothing has run
yet at the fork.) Once the test writes SPEC's `go_file`, this process, which has trained nothing itself, reaps the
children, trains an uninterrupted baseline and resumes every RUN_DIR with `resume_from_checkpoint=True`. The points
are places inside `transformers.Trainer._save_checkpoint` and the reference file write:

- "start": before the model of the checkpoint is saved (the folder may not exist yet);
- "model": after the model files, before the optimizer, scheduler, RNG and trainer state;
- "state": after trainer_state.json, before the reference file;
- "rename": the reference file written under its temporary name, before the rename that publishes it.

It writes each run's final weights (`final.safetensors`) and SPEC's `report` (JSON): how each child ended, and what
each resume trained and logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


def trainer_for(spec, output_dir):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_cpo import CPOConfig, CPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    args = CPOConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=spec["max_steps"],
        save_strategy="steps",
        save_steps=spec["save_steps"],
        logging_steps=1,
        seed=0,
        data_seed=0,
    )
    return CPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype="float32"),
        args=args,
        train_dataset=load_from_disk(spec["data_dir"]),
        processing_class=tokenizer,
    )


def block(run_dir):
    with open(run_dir + ".blocked", "w") as f:
        f.write(str(os.getpid()))
    while True:  # until SIGKILL
        time.sleep(1)


def install_block(trainer, run_dir, point, kill_step):
    from transformers.trainer_callback import TrainerState

    import trl_cpo.reference_store as reference_module

    folder = os.path.join(run_dir, f"checkpoint-{kill_step}")
    is_target = lambda path: os.path.abspath(str(path)).startswith(os.path.abspath(folder))  # noqa: E731

    if point == "start":
        original_save_model = trainer.save_model

        def save_model(output_dir=None, _internal_call=False):
            if _internal_call and is_target(output_dir):
                block(run_dir)
            return original_save_model(output_dir, _internal_call=_internal_call)

        trainer.save_model = save_model
    elif point == "model":
        original_save_optimizer = trainer._save_optimizer_and_scheduler

        def save_optimizer(output_dir):
            if is_target(output_dir):
                block(run_dir)
            return original_save_optimizer(output_dir)

        trainer._save_optimizer_and_scheduler = save_optimizer
    elif point == "state":
        original_save_to_json = TrainerState.save_to_json

        def save_to_json(self, json_path):
            original_save_to_json(self, json_path)
            if is_target(json_path):
                block(run_dir)

        TrainerState.save_to_json = save_to_json
    elif point == "rename":
        original_replace = reference_module.os.replace

        def replace(src, dst):
            if is_target(dst) and str(dst).endswith(reference_module.REFERENCE_FILE):
                block(run_dir)
            return original_replace(src, dst)

        reference_module.os.replace = replace
    else:
        raise SystemExit(f"unknown point {point!r}")


def run_child(spec, run_dir, point):
    try:
        trainer = trainer_for(spec, run_dir)
        install_block(trainer, run_dir, point, spec["kill_step"])
        trainer.train()
        print(f"the run finished without reaching {point!r}", file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        os._exit(3)


def main(argv):
    spec_path, *targets = argv
    with open(spec_path) as f:
        spec = json.load(f)
    # Imported before the fork, so the children do not pay for it (`import trl_cpo` alone is lazy: name the classes).
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from trl_cpo import CPOConfig, CPOTrainer  # noqa: F401

    children = {}
    for target in targets:
        run_dir, point = target.rsplit(":", 1)
        pid = os.fork()
        if pid == 0:
            run_child(spec, run_dir, point)
        children[run_dir] = pid
    while not os.path.exists(spec["go_file"]):
        time.sleep(0.2)
    report = {}
    for run_dir, pid in children.items():
        _, status = os.waitpid(pid, 0)
        report[run_dir] = {"child_signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}

    from safetensors.torch import save_file

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("trl_cpo").addHandler(handler)
    for run_dir in [spec["baseline_dir"], *children]:
        records.clear()
        result = report.setdefault(run_dir, {})
        trainer = trainer_for(spec, run_dir)
        try:
            trainer.train(resume_from_checkpoint=run_dir != spec["baseline_dir"])
        except Exception as error:  # noqa: BLE001 - reported to the test, which decides
            result.update(error=f"{type(error).__name__}: {error}", warnings=list(records))
            continue
        weights = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(weights, os.path.join(run_dir, "final.safetensors"))
        steps = [h["step"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        result.update(global_step=trainer.state.global_step, steps=steps, warnings=list(records))
    with open(spec["report"], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
