"""What the audit writes: `audit.json` (schema below, documented field by field in docs/diagnostics.md), `pairs.jsonl`
(one line per scored pair) and the terminal tables.

`audit.json` schema, version `SCHEMA_VERSION`. Fields are only ever added within a version; a rename or a change of
meaning bumps it.

- the trainers' reference report (`trl_cpo.report.reference_report`, the function the trainers call) under the names
  a training run logs, without the `reference/` prefix: `ReferenceReport.LOGGED_KEYS` (null where a field does not
  apply to the method), then `report_method`, `num_pairs`, `loss_space`, `delta_ref_quantiles`, `lift_share`,
  `recommended_cpo_gamma_reason`, `report_warnings`;
- the inputs: `method`, `model_name_or_path`, `dataset_name`, `dataset_train_split`, `loss_type`, `beta`,
  `max_length`, `truncation_mode`, `method_settings`, pair counts, `num_processes`;
- the audit's own numbers: `spaces`, `sign_crosstab`, `sign_differs_fraction`, `misaligned_in_one_space_fraction`,
  `length_buckets`, `confident`, `cpo`, `cpo_at_recommended_gamma`, `ecpoc`, `hypo`, `verdict`, `verdict_text`,
  `verdict_caveat`;
- the reference log-probs file: `reference_logps_file`, `fingerprint`.
"""

from __future__ import annotations

import json
import math
import os
import textwrap

from trl_cpo.diagnostics import pair_columns
from trl_cpo.logps import is_length_normalized
from trl_cpo.report import ReferenceReport

from .args import PAIRS_FILE, REPORT_FILE, AuditSettings

#: Version of the `audit.json` layout.
SCHEMA_VERSION = 1
WIDTH = 119


def _jsonable(value):
    """Plain JSON values: non-finite floats as strings ('inf'), tensors as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl-cpo")
    except PackageNotFoundError:
        return "unknown"


def report_json(settings: AuditSettings, scored, report: ReferenceReport, numbers: dict) -> dict:
    """The `audit.json` payload (see the module docstring)."""
    config = scored.config
    payload: dict[str, object] = {"schema_version": SCHEMA_VERSION, "trl_cpo_version": _version()}
    payload.update({name: getattr(report, name) for name in ReferenceReport.LOGGED_KEYS})
    payload.update(
        report_method=report.method,
        num_pairs=report.num_pairs,
        loss_space=report.loss_space,
        delta_ref_quantiles=report.delta_ref_quantiles,
        lift_share=report.lift_share,
        recommended_cpo_gamma_reason=report.recommendation,
        report_warnings=list(report.warnings),
    )
    mixture = settings.datasets.datasets
    payload.update(
        method=settings.script.method,
        model_name_or_path=settings.model.model_name_or_path,
        dataset_name=settings.script.dataset_name if not mixture else [d.path for d in mixture],
        dataset_train_split=settings.script.dataset_train_split,
        loss_type=config.loss_type,
        beta=config.beta,
        max_length=config.max_length,
        truncation_mode=config.truncation_mode,
        method_settings=settings.method.settings(config),
        max_samples=settings.audit.max_samples,
        num_pairs_input=scored.num_input,
        num_pairs_dropped=scored.num_input - report.num_pairs,
        num_pairs_truncated=scored.num_truncated,
        num_processes=scored.num_processes,
    )
    verdict = numbers["verdict"]
    payload.update({k: numbers[k] for k in ("spaces", "sign_crosstab", "sign_differs_fraction")})
    payload.update({k: numbers[k] for k in ("misaligned_in_one_space_fraction", "length_buckets", "confident")})
    payload.update({k: numbers[k] for k in ("cpo", "cpo_at_recommended_gamma", "ecpoc", "hypo")})
    payload.update(verdict=verdict.branch, verdict_text=verdict.text, verdict_caveat=verdict.caveat)
    payload.update(
        reference_logps_file=os.path.abspath(settings.reference_file), fingerprint=scored.fingerprint.to_dict()
    )
    return _jsonable(payload)


def pair_rows(scored, numbers: dict) -> list[dict]:
    """One dict per scored pair: the columns training's per-pair files have (`trl_cpo.diagnostics.PAIR_COLUMNS`; the
    policy's are null, nothing has trained yet), then the audit's own: `confident_misaligned`, `cpo_target`,
    `ecpoc_target`."""
    reference, per_pair, config = scored.reference, numbers["per_pair"], scored.config
    columns = pair_columns(
        scored.rows,
        reference.chosen,
        reference.rejected,
        reference.chosen_lengths,
        reference.rejected_lengths,
        length_normalized=is_length_normalized(config.loss_type),
        target=per_pair["target"],
        beta=config.beta,
    )
    columns.update({name: per_pair[name].tolist() for name in ("confident_misaligned", "cpo_target", "ecpoc_target")})
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def write_files(settings: AuditSettings, payload: dict, pairs: list[dict]) -> list[str]:
    os.makedirs(settings.output_dir, exist_ok=True)
    path = os.path.join(settings.output_dir, PAIRS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in pairs)
    report_path = os.path.join(settings.output_dir, REPORT_FILE)
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    return [report_path, path]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _ci(summary: dict, prefix: str = "misaligned_fraction") -> str:
    low, high = summary[f"{prefix}_ci_low"], summary[f"{prefix}_ci_high"]
    return f"{_pct(summary[prefix])} [{100 * low:.1f}-{100 * high:.1f}]"


def format_tables(payload: dict) -> str:
    """The audit's terminal output (the trainers' own report table is printed before it, by the trainer)."""
    spaces, loss_space = payload["spaces"], ("per_token" if payload["loss_space"] != "summed" else "summed")
    mark = {space: " *" if space == loss_space else "" for space in spaces}
    split = f" (split {payload['dataset_train_split']})"
    lines = [
        "",
        f"Audit of {payload['dataset_name']}{split} with {payload['model_name_or_path']} (method {payload['method']})",
        f"  {payload['num_pairs']} pairs scored of {payload['num_pairs_input']}; {payload['num_pairs_dropped']} dropped "
        f"(prompt fills max_length={payload['max_length']}), {payload['num_pairs_truncated']} truncated",
        "",
        f"  {'':36}{'summed' + mark['summed']:>28}{'per-token' + mark['per_token']:>28}",
    ]
    rows = [
        ("misaligned (delta_ref < 0) [95% CI]", lambda s: _ci(s)),
        ("ties (delta_ref = 0)", lambda s: _pct(s["tie_fraction"])),
        (
            "delta_ref p5 / p50 / p95",
            lambda s: " / ".join(f"{s['delta_ref_quantiles'][q]:.3g}" for q in ("p5", "p50", "p95")),
        ),
    ]
    for name, cell in rows:
        lines.append(f"  {name:<36}{cell(spaces['summed']):>28}{cell(spaces['per_token']):>28}")
    lines += [
        f"  (* the loss's space, loss_type={payload['loss_type']})",
        "",
        "Sign of delta_ref, summed (rows) vs per-token (columns)",
    ]
    lines.append(f"  {'':14}{'per-token <0':>14}{'=0':>8}{'>0':>8}")
    for row_sign, label in (("negative", "summed <0"), ("zero", "summed =0"), ("positive", "summed >0")):
        counts = payload["sign_crosstab"][f"summed_{row_sign}"]
        cells = [counts[f"per_token_{s}"] for s in ("negative", "zero", "positive")]
        lines.append(f"  {label:<14}{cells[0]:>14}{cells[1]:>8}{cells[2]:>8}")
    lines += [
        f"  sign differs between the spaces on {_pct(payload['sign_differs_fraction'])} of pairs; misaligned in "
        f"exactly one space: {_pct(payload['misaligned_in_one_space_fraction'])}",
        "",
        "Misaligned by mean completion length of the pair (tokens) [95% CI]",
        f"  {'tokens':<16}{'pairs':>7}{'summed':>26}{'per-token':>26}",
    ]
    for bucket in payload["length_buckets"]:
        tokens = f"{bucket['min_tokens']:.4g}-{bucket['max_tokens']:.4g}"
        lines.append(
            f"  {tokens:<16}{bucket['num_pairs']:>7}{_ci(bucket, 'misaligned_fraction_summed'):>26}"
            f"{_ci(bucket, 'misaligned_fraction_per_token'):>26}"
        )
    cpo, ecpoc, hypo, confident = payload["cpo"], payload["ecpoc"], payload["hypo"], payload["confident"]
    lines += [
        "",
        "What the methods do to the misaligned pairs (share lifted to a target >= 0, in the loss's space)",
        f"  CPO cpo_gamma={cpo['cpo_gamma']:.4g}: lifts {_pct(cpo['lifted_fraction'])}, margins at cpo_max_margin "
        f"{_pct(cpo['margin_at_cap_fraction'])}",
    ]
    at_recommended = payload["cpo_at_recommended_gamma"]
    if at_recommended is not None:
        lines.append(
            f"  CPO cpo_gamma={at_recommended['cpo_gamma']:.4g} (recommended): lifts "
            f"{_pct(at_recommended['lifted_fraction'])}, margins at cpo_max_margin "
            f"{_pct(at_recommended['margin_at_cap_fraction'])}"
        )
    lines += [
        f"  E-CPOC ecpoc_gamma={ecpoc['ecpoc_gamma']:g}: lifts {_pct(ecpoc['lifted_fraction'])}, floor binds on "
        f"{_pct(ecpoc['floor_binding_fraction'])} of pairs",
        f"  HyPO (target max(delta_ref, 0)): lifts {_pct(hypo['lifted_fraction'])}, changes the target of "
        f"{_pct(hypo['floor_binding_fraction'])} of pairs (those with delta_ref < 0)",
        f"  reference confident (|delta_ref| >= {confident['threshold']:.3g}, its {confident['quantile']:.0%} quantile) "
        f"on {_pct(confident['misaligned_confident_fraction'])} of the misaligned pairs",
        "",
    ]
    lines += textwrap.wrap(f"Verdict ({payload['verdict']}): {payload['verdict_text']}", WIDTH)
    if payload["verdict_caveat"]:
        lines += textwrap.wrap(f"Caveat: {payload['verdict_caveat']}", WIDTH)
    return "\n".join(lines)
