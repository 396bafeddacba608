"""The end of a 2-process DDP run over gloo, reduced to what deadlocked, repeated: launch with
`python -m torch.distributed.run --nproc_per_node 2 teardown_worker.py MODE ITERATIONS`.

Each iteration builds a process group and a DDP model on it, takes one training step, makes the all-gather the
Trainer makes at the end of `train()` (`store_flos`), ends the run and frees the model, which frees DDP's Reducer with
the GIL held. MODE=trl_cpo ends with `trl_cpo._distributed.end_distributed_run`, as the trainers' `end()` does;
MODE=plain destroys the group as `Trainer.end()` does, after which freeing the model can deadlock (see
trl_cpo/_distributed.py). MODE=exit (ITERATIONS ignored) reproduces the race at interpreter exit instead, with the
last collective's release slowed down (`slow_release_at_exit`); MODE=exit-no-drain is the same without the drain that
`end_distributed_run` waits. Prints "clean exit" on each rank that gets to the end.
"""

import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# Loaded by path: importing the `trl_cpo` package would pull in transformers and TRL, seconds per process.
_spec = importlib.util.spec_from_file_location(
    "trl_cpo_distributed", Path(__file__).resolve().parents[2] / "trl_cpo" / "_distributed.py"
)
_distributed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_distributed)
end_distributed_run = _distributed.end_distributed_run


def one_run(mode: str) -> None:
    group = dist.new_group(backend="gloo")
    model = DistributedDataParallel(torch.nn.Linear(4, 4), process_group=group)
    model(torch.randn(2, 4)).sum().backward()
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.ones(1), group=group)
    del gathered  # the gathered tensors now live on only in the gloo worker's finished work
    if mode == "trl_cpo":
        end_distributed_run(
            partial(dist.destroy_process_group, group), partial(dist.barrier, group=group), group=group
        )
    else:
        dist.destroy_process_group(group)
    del group
    del model  # DDP's Reducer is freed here, with the GIL held


class SlowToFree(torch.Tensor):
    """A tensor whose release takes `SLOW_RELEASE_SECONDS` with the GIL released: a gloo worker freeing it stands for
    one descheduled while it releases a finished collective's work."""

    def __del__(self):
        time.sleep(SLOW_RELEASE_SECONDS)


#: How long the "exit" mode's worker takes to free the last all-gather's tensors (below WORKER_DRAIN_SECONDS).
SLOW_RELEASE_SECONDS = 0.2


def slow_release_at_exit() -> None:
    """The exit race (trl_cpo/_distributed.py): a DDP model holds the default group past every atexit handler, and
    the last collective's tensors, already dropped by Python, are freed by a gloo worker as the script ends."""
    model = DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    gathered = [torch.zeros(1).as_subclass(SlowToFree) for _ in range(dist.get_world_size())]
    work = dist.all_gather(gathered, torch.ones(1), async_op=True)
    del gathered, work  # the worker drops the last reference when the all-gather completes
    end_distributed_run(dist.destroy_process_group, dist.barrier)
    print("clean exit", flush=True)  # then the interpreter finalizes, with `model` still a live local


def main(mode: str, iterations: int) -> None:
    if mode not in ("trl_cpo", "plain", "exit", "exit-no-drain"):
        raise SystemExit(f"unknown mode {mode!r}")
    dist.init_process_group("gloo")
    if mode.startswith("exit"):
        if mode == "exit-no-drain":  # for measuring the race without the fix, not used by the tests
            _distributed.WORKER_DRAIN_SECONDS = 0
        slow_release_at_exit()  # one run: the race is at the interpreter's exit
        return
    for _ in range(iterations):
        one_run(mode)
    end_distributed_run(dist.destroy_process_group, dist.barrier)
    print("clean exit", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
