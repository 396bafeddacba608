"""Where a run's reference log-probs come from: a precompute before training, or DPOTrainer's live reference forward.

CPO and E-CPOC need, per pair, only the reference's completion log-probs and the completion lengths, and DPOTrainer has
both in every batch: read from precomputed columns (`precompute_ref_log_probs=True`) or computed by its reference
forward at each step (`False`). The trainers compute the margin inside the loss step from whichever arrives, so both
modes run the same loss.

The precompute is the default wherever it can run: it is faster, it gives the reference report before training, and
it binds checkpoints to their data. `precompute_ref_log_probs=None` (the methods' configs' default, and what a plain
`DPOConfig`'s default `False` is read as) resolves at construction: on for map-style text data, off (live) for an
`IterableDataset`, vision data or `sync_ref_model=True`, with one log line saying which and why. An explicit `True`
is passed to TRL as is, so streamed or vision data fail exactly as DPOTrainer fails.
"""

from __future__ import annotations

import copy
import logging

import torch

from .reference import ReferenceLogps

logger = logging.getLogger(__name__)


def _named_datasets(train_dataset, eval_dataset) -> list[tuple[str, object]]:
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items()]
    elif eval_dataset is not None and not isinstance(eval_dataset, str):
        named.append(("eval_dataset", eval_dataset))
    return [(name, dataset) for name, dataset in named if dataset is not None]


def _first_row(dataset) -> dict | None:
    try:
        return next(iter(dataset))
    except (StopIteration, TypeError):
        return None


def precompute_blocker(args, train_dataset, eval_dataset) -> str | None:
    """Why the reference log-probs of these datasets cannot be precomputed under `args` (None when they can).

    The same conditions under which DPOTrainer refuses `precompute_ref_log_probs=True`: a streamed dataset, vision
    data (TRL decides from the train set's first row: an 'image' or 'images' column), `sync_ref_model`.
    """
    from datasets import IterableDataset

    if args.sync_ref_model:
        return "sync_ref_model=True updates the reference during training, so its log-probs cannot be computed before"
    named = _named_datasets(train_dataset, eval_dataset)
    for name, dataset in named:
        if isinstance(dataset, IterableDataset):
            return f"{name} is an IterableDataset (streamed data cannot be scored before training)"
    row = _first_row(train_dataset) if train_dataset is not None else None
    if isinstance(row, dict) and ("image" in row or "images" in row):
        return "train_dataset holds images (TRL precomputes no reference log-probs for vision data)"
    return None


def resolve_precompute(args, train_dataset, eval_dataset, *, trainer_name: str, from_dpo_config: bool = False):
    """`args` with `precompute_ref_log_probs` decided: unchanged when it is True or False, else a copy with it set
    (on when the data allows a precompute, live otherwise), announced in one log line (a warning when the user gave a
    plain DPOConfig, whose `precompute_ref_log_probs=False` is read this way, or when the reference goes live)."""
    if args.precompute_ref_log_probs is not None:
        return args
    blocker = precompute_blocker(args, train_dataset, eval_dataset)
    resolved = copy.copy(args)
    resolved.precompute_ref_log_probs = blocker is None
    given = f"a plain DPOConfig (every field kept, read as {type(args).__name__})" if from_dpo_config else ""
    if blocker is None:
        announce = logger.warning if from_dpo_config else logger.info
        announce(
            "%s%s: reference log-probs precomputed before training (precompute_ref_log_probs resolved to True: the "
            "data allows it; the margins are computed from them at each step).",
            trainer_name,
            f" got {given}" if given else "",
        )
    else:
        logger.warning(
            "%s%s: live reference (precompute_ref_log_probs resolved to False): %s. The margin is computed at each "
            "step from DPOTrainer's reference forward, and the reference report accumulates over training.",
            trainer_name,
            f" got {given}" if given else "",
            blocker,
        )
    return resolved


class RunningReference:
    """The train pairs' reference log-probs and completion lengths seen so far, in live mode (gathered over ranks).

    A pair seen again in a later epoch counts again: with a frozen reference its values repeat, so the shares stay
    those of the data; with `sync_ref_model` they follow the synced reference.
    """

    def __init__(self):
        self._parts: list[tuple[torch.Tensor, ...]] = []

    def add(self, *per_pair: torch.Tensor) -> None:
        """Add (chosen, rejected, chosen_lengths, rejected_lengths) of one gathered micro-batch."""
        self._parts.append(tuple(t.detach().float().cpu() for t in per_pair))

    def __len__(self) -> int:
        return sum(len(part[0]) for part in self._parts)

    def reference(self) -> ReferenceLogps | None:
        if not self._parts:
            return None
        chosen, rejected, chosen_lengths, rejected_lengths = (torch.cat(column) for column in zip(*self._parts))
        self._parts = [(chosen, rejected, chosen_lengths, rejected_lengths)]  # keep one part: later cats stay cheap
        return ReferenceLogps(chosen, rejected, chosen_lengths, rejected_lengths)
