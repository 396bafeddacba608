r"""Training diagnostics: the metrics both trainers (and `DiagnosticsCallback`) log at every step, and the per-pair
evidence written at the end of training, at evaluations and by `trl-cpo audit`.

Every quantity is computed in the loss's log-prob space (summed, or per-token averaged for ``loss_type='sigmoid_norm'``)
from tensors the step already has: the policy's completion log-probs (recorded from the loss's own forward), the
reference's (precomputed columns or the live reference forward), the completion lengths and the method's target.
The definitions, with their sources, are the pure functions of `trl_cpo.metrics`:

==========================  ======================================================================  ====================
name                        per pair (``d_pi = delta_pi``, ``d_ref = delta_ref``, ``z`` the logit)  source
==========================  ======================================================================  ====================
``u_fraction``              ``d_ref + atol < d_pi < 0``                                             arXiv:2605.20834
``ref_misaligned_fraction`` ``d_ref < 0``                                                           arXiv:2605.20834
``ranking_accuracy``        ``logp_pi(y_w) > logp_pi(y_l)``                                         arXiv:2405.19534
``ref_ranking_accuracy``    ``logp_ref(y_w) > logp_ref(y_l)``                                       arXiv:2405.19534
``likelihood_displacement`` ``logp_pi(y_w) < logp_ref(y_w) - atol``                                 arXiv:2410.08847
``both_fell``               both ``logp_pi(y) < logp_ref(y) - atol``                                arXiv:2410.08847
``saturated_fraction``      ``sigmoid(-z) < 0.01``, ``z = beta * (d_pi - target)``                  arXiv:2305.18290
==========================  ======================================================================  ====================

``atol`` is `trl_cpo.metrics.U_FRACTION_ATOL` (round-off between the training forward and the reference precompute).
"""

from __future__ import annotations

import json
import os

import torch

from . import metrics
from .logps import to_loss_space

#: Every metric a step logs, in this order (`step_metrics`); `u_fraction` and `ref_misaligned_fraction` predate the
#: others.
STEP_METRICS = (
    "u_fraction",
    "ref_misaligned_fraction",
    "ranking_accuracy",
    "ref_ranking_accuracy",
    "likelihood_displacement",
    "both_fell",
    "saturated_fraction",
)
#: The metrics `step_metrics` computes (a benchmark narrows it to the first two to time the step without the others).
LOGGED = STEP_METRICS
ATOL = metrics.U_FRACTION_ATOL

#: Folder under `output_dir` of the per-pair files. Its leading underscore keeps it out of `push_to_hub` (the Trainer
#: uploads `output_dir` without `_*`): the files describe the training data row by row.
PAIRS_DIR = "_diagnostics"


def _flags(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> dict[str, torch.Tensor]:
    return {
        "in_u": metrics.in_undesirable_space(policy_chosen, policy_rejected, ref_chosen, ref_rejected, atol=ATOL),
        "displaced": metrics.displaced(policy_chosen, ref_chosen, atol=ATOL),
        "rejected_fell": metrics.displaced(policy_rejected, ref_rejected, atol=ATOL),
    }


@torch.no_grad()
def step_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    logits: torch.Tensor | None,
) -> dict[str, float]:
    """Every metric of `LOGGED` over a batch (the module docstring's table), as plain floats.

    The log-probs are per pair, in the loss's space; `logits` is ``beta * (delta_pi - target)`` per pair, or None when
    the loss has no such logit (a plain DPOTrainer with a loss other than 'sigmoid' / 'sigmoid_norm'):
    `saturated_fraction` is then left out. One device-to-host copy for all of them.
    """
    compute = {
        "u_fraction": lambda: metrics.u_fraction(policy_chosen, policy_rejected, ref_chosen, ref_rejected, atol=ATOL),
        "ref_misaligned_fraction": lambda: metrics.ref_misaligned_fraction(ref_chosen, ref_rejected),
        "ranking_accuracy": lambda: metrics.ranking_accuracy(policy_chosen, policy_rejected),
        "ref_ranking_accuracy": lambda: metrics.ranking_accuracy(ref_chosen, ref_rejected),
        "likelihood_displacement": lambda: metrics.likelihood_displacement(policy_chosen, ref_chosen, atol=ATOL),
        "both_fell": lambda: metrics.both_fell(policy_chosen, policy_rejected, ref_chosen, ref_rejected, atol=ATOL),
        "saturated_fraction": lambda: metrics.saturated_fraction(logits),
    }
    names = [name for name in LOGGED if logits is not None or name != "saturated_fraction"]
    values = torch.stack([compute[name]().float() for name in names]).tolist()
    return dict(zip(names, values))


# -- per-pair evidence ---------------------------------------------------------------------------------------------------

#: The columns every per-pair file has, training's and the audit's (`pair_columns`), in order; docs/diagnostics.md
#: describes each. The policy columns are null in the audit's file (no policy has trained yet).
PAIR_COLUMNS = (
    "row",
    "chosen_tokens",
    "rejected_tokens",
    "chosen_logp",
    "rejected_logp",
    "delta_ref_summed",
    "delta_ref_per_token",
    "delta_ref",
    "target",
    "misaligned",
    "policy_chosen_logp",
    "policy_rejected_logp",
    "delta_pi",
    "weight",
    "in_u",
    "displaced",
    "both_fell",
    "saturated",
)


@torch.no_grad()
def pair_columns(
    rows,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    length_normalized: bool,
    target: torch.Tensor | None,
    beta: float,
    policy_chosen: torch.Tensor | None = None,
    policy_rejected: torch.Tensor | None = None,
) -> dict[str, list]:
    """`PAIR_COLUMNS` as lists, one entry per pair: `rows` (the pairs' input rows), summed log-probs, completion token
    counts (eos included, as TRL counts them), the method's `target` in the loss's space (None: no logistic target),
    and the policy's summed log-probs if there is a policy (else its columns are None)."""
    lengths = (chosen_lengths, rejected_lengths)
    # float32, as `trl_cpo.reference.ReferenceLogps.delta_ref` computes them (the audit's tables count these values).
    summed = ref_chosen.float() - ref_rejected.float()
    per_token_chosen, per_token_rejected = to_loss_space(ref_chosen, ref_rejected, *lengths, True)
    space_chosen, space_rejected = to_loss_space(ref_chosen, ref_rejected, *lengths, length_normalized)
    delta_ref = space_chosen - space_rejected
    n = len(summed)
    columns: dict[str, list] = {
        "row": [int(r) for r in rows],
        "chosen_tokens": chosen_lengths.long().tolist(),
        "rejected_tokens": rejected_lengths.long().tolist(),
        "chosen_logp": ref_chosen.tolist(),
        "rejected_logp": ref_rejected.tolist(),
        "delta_ref_summed": summed.tolist(),
        "delta_ref_per_token": (per_token_chosen - per_token_rejected).tolist(),
        "delta_ref": delta_ref.tolist(),
        "target": [None] * n if target is None else target.tolist(),
        "misaligned": (delta_ref < 0).tolist(),
    }
    if policy_chosen is None:
        columns.update({name: [None] * n for name in PAIR_COLUMNS[len(columns) :]})
        return columns
    policy = to_loss_space(policy_chosen, policy_rejected, *lengths, length_normalized)
    delta_pi = policy[0] - policy[1]
    flags = _flags(*policy, space_chosen, space_rejected)
    logits = None if target is None else beta * (delta_pi - target)
    columns.update(
        policy_chosen_logp=policy_chosen.tolist(),
        policy_rejected_logp=policy_rejected.tolist(),
        delta_pi=delta_pi.tolist(),
        weight=[None] * n if logits is None else metrics.dpo_weight(logits).tolist(),
        in_u=flags["in_u"].tolist(),
        displaced=flags["displaced"].tolist(),
        both_fell=(flags["displaced"] & flags["rejected_fell"]).tolist(),
        saturated=[None] * n if logits is None else metrics.saturated(logits).tolist(),
    )
    return columns


def write_pairs(path: str, columns: dict[str, list]) -> str:
    """Write `columns` as JSON lines (one object per pair, keys in column order) to `path`, atomically; its path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(zip(columns, values))) + "\n" for values in zip(*columns.values()))
    os.replace(partial, path)
    return path


def read_pairs(path: str) -> list[dict]:
    """The rows of a per-pair file (training's or the audit's `pairs.jsonl`)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(columns: dict[str, list]) -> dict[str, float]:
    """Shares over a per-pair file's rows: the diagnostics of the whole split at once (what the model card shows)."""
    n = len(columns["row"])

    def share(name: str) -> float | None:
        values = columns[name]
        return None if not n or values[0] is None else sum(bool(v) for v in values) / n

    delta_pi = columns["delta_pi"]
    ranking = None if not n or delta_pi[0] is None else sum(d > 0 for d in delta_pi) / n
    return {
        "num_pairs": n,
        "u_fraction": share("in_u"),
        "ref_misaligned_fraction": share("misaligned"),
        "ranking_accuracy": ranking,
        "ref_ranking_accuracy": sum(d > 0 for d in columns["delta_ref"]) / n if n else None,
        "likelihood_displacement": share("displaced"),
        "both_fell": share("both_fell"),
        "saturated_fraction": share("saturated"),
    }


# -- the model card's summary --------------------------------------------------------------------------------------------

#: What each metric is, in the model card's words.
CARD_LABELS = {
    "u_fraction": "pairs in U (`delta_ref < delta_pi < 0`)",
    "ref_misaligned_fraction": "reference prefers the rejected response",
    "ranking_accuracy": "policy prefers the chosen response (ranking accuracy)",
    "ref_ranking_accuracy": "reference prefers the chosen response",
    "likelihood_displacement": "chosen log-prob below the reference's",
    "both_fell": "chosen and rejected log-probs both below the reference's",
    "saturated_fraction": "gradient weight `sigmoid(-z)` below 0.01",
}


def card_section(log_history: list[dict], final: dict[str, dict]) -> str:
    """Markdown: the diagnostics at the end of training, from the last logged training and evaluation entries and, when
    the per-pair files were written, over each whole split at the final weights (`DiagnosticsCallback.final`)."""
    columns: list[tuple[str, dict]] = []
    for prefix, title in (("", "last logged training step"), ("eval_", "last evaluation")):
        entries = [entry for entry in log_history if f"{prefix}ranking_accuracy" in entry]
        if entries:
            last = entries[-1]
            values = {name: last.get(f"{prefix}{name}") for name in STEP_METRICS}
            columns.append((f"{title} (step {last.get('step')})", values))
    columns += [
        (f"{split} set, final weights ({values['num_pairs']} pairs)", values) for split, values in final.items()
    ]
    if not columns:
        return "No diagnostics were logged (the card was written before the first logging step)."
    lines = [
        "| share of pairs | " + " | ".join(title for title, _ in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for name, label in CARD_LABELS.items():
        cells = [" - " if values.get(name) is None else f"{values[name]:.3g}" for _, values in columns]
        lines.append(f"| `{name}`: {label} | " + " | ".join(cells) + " |")
    note = (
        "Computed in the loss's log-prob space (see `trl_cpo.diagnostics`). DPO's `rewards/accuracies` counts a pair "
        "in U as correct; `ranking_accuracy` counts it as wrong."
    )
    if final:
        note += f" Per pair, keyed by dataset row: `{PAIRS_DIR}/<split>.jsonl` in the training run's output folder."
    return "\n".join(lines) + "\n\n" + note
