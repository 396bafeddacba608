"""Ending a distributed run without the gloo teardown deadlock.

`Trainer.end()` destroys the default process group, but the group object lives on while DDP's C++ `Reducer` holds it.
When the trainer is then freed (in the recipe: as soon as `main()` returns), the `Reducer`'s Python binding drops the
last reference to the group *with the GIL held*, and `ProcessGroupGloo`'s destructor joins its worker threads. A worker
that has just finished a collective still holds that collective's work, whose tensors belong to Python objects: freeing
them needs the GIL, which the joining thread holds. Both wait forever. It happens on a non-main rank, which has nothing
to write after training: its last collective (the Trainer's `store_flos` all-gather at the end of `train()`) is only
milliseconds old when the trainer is freed, and on a busy CPU the worker thread is not scheduled in between. Seen with
torch 2.13 on CPU (gloo), about one 2-process run in eight; py-spy shows the main thread in
`Reducer` dealloc -> `~ProcessGroupGloo` -> `std::thread::join` and a gloo worker in `~AsyncAllgatherWork` ->
`gil_scoped_acquire`. Upstream context: pytorch/pytorch#56297 (blocking destructors of pybind-bound classes) and
pytorch/pytorch#154976 (which made the `ProcessGroup` binding release the GIL before destruction, but not the
`Reducer`'s).

The fix keeps a Python reference to the group until the interpreter exits, so the `Reducer` never holds the last one:
the group is destroyed through the `ProcessGroup` binding, which releases the GIL first and lets the workers finish.

A second race sits at interpreter exit. Once DDP has wrapped a model, the group outlives every `atexit` handler
(DDP's construction leaves references to it that nothing releases: the default group's Python refcount stays 13 after
`destroy_process_group`, against 2 without DDP), so its gloo workers still run while Python finalizes. A worker that
is releasing a finished collective's work at that moment (an all-gather whose tensors Python already dropped: freeing
them needs the GIL) is ended by Python 3.11's finalizing `PyEval_RestoreThread`, whose forced unwind hits a
`noexcept` destructor in gloo's worker loop: `std::terminate`, "terminate called without an active exception", exit
-6 on a rank that has nothing left to write. Seen about once in 22 two-process launches on a loaded 2-core CPU. All
ranks have met at a barrier by then, so every collective has completed; `end_distributed_run` then waits
`WORKER_DRAIN_SECONDS` with the GIL released, for the workers to finish releasing them before the script can exit.
That narrows the window from microseconds after a barrier to a worker descheduled for half a second; it cannot
close it while the group outlives the interpreter (tests/test_distributed_exit.py amplifies the release to check it).
Upstream: pytorch/pytorch#179291 (an atexit `destroy_process_group` for exactly this crash, abandoned as harder than
it looked) and pytorch/pytorch#190489 (the same message when a script never destroys its group).
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable

import torch.distributed as dist

#: Seconds `end_distributed_run` leaves the gloo workers, after every rank has met, to release the collectives they
#: finished before the interpreter finalizes (module docstring). Paid once per run.
WORKER_DRAIN_SECONDS = 0.5
#: Process groups kept alive past `Trainer.end()`, released at interpreter exit (see the module docstring), while the
#: interpreter is still whole: `atexit` handlers run before module teardown.
_KEPT_GROUPS: list = []
#: True while `end_distributed_run` runs `end`, so that an `end` which calls it again does not meet and drain twice.
_ENDING = False
atexit.register(_KEPT_GROUPS.clear)


def end_distributed_run(end: Callable[[], None], wait_for_everyone: Callable[[], None], group=None) -> None:
    """Call `end` (`Trainer.end`: finish trackers, destroy the process group) without the gloo teardown deadlock.

    All ranks first meet at a barrier (`wait_for_everyone`), so that no rank tears down while another is still saving
    or communicating; `group` (default: the default group) is then kept referenced until the interpreter exits. Just
    calls `end` when no process group exists.
    """
    global _ENDING
    if _ENDING or not (dist.is_available() and dist.is_initialized()):
        # Nested (`end_training` on a trainer whose own `end` comes here): the outer call meets, keeps and drains.
        end()
        return
    group = dist.group.WORLD if group is None else group
    _ENDING = True
    try:
        wait_for_everyone()
        end()
    finally:
        _ENDING = False
    _KEPT_GROUPS.append(group)
    time.sleep(WORKER_DRAIN_SECONDS)  # the GIL is free: workers finish releasing their last works before exit


def end_training(trainer) -> None:
    """End a distributed run of any `transformers.Trainer` (e.g. a plain `trl.DPOTrainer` with `UFractionCallback`).

    Call it once on every process, as the script's last use of the trainer (after `train`, `evaluate`, `save_model`,
    `push_to_hub`): all processes meet, then `trainer.end()` finishes the trackers and destroys the process group,
    which stays referenced until the interpreter exits (module docstring). Without it a 2-process gloo run can abort
    at exit ("terminate called without an active exception") or hang in the teardown. `CPOTrainer.end()` and
    `ECPOCTrainer.end()` do the same; a single process just calls `trainer.end()`.
    """
    end_distributed_run(trainer.end, trainer.accelerator.wait_for_everyone)
