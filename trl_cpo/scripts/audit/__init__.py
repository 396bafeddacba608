"""`trl-cpo audit`: before training, what the frozen reference says about the training pairs, and what to do.

DPO's target is the reference log-odds ``delta_ref = logp_ref(y_w) - logp_ref(y_l)``; on pairs with ``delta_ref < 0``
DPO can lower its loss while the policy still prefers the rejected response (arXiv:2605.20834). The audit runs the
training run's own pipeline (`--config <the training YAML>`: same model, tokenizer, truncation and method settings)
up to the end of the reference precompute, and reports:

- the trainers' reference report (`trl_cpo.report.reference_report`, the same function, so the numbers equal a
  training run's `reference/*` logs);
- both log-prob spaces side by side with the sign-agreement cross-tab, and misalignment per completion-length bucket;
- a verdict computed from the numbers (`analysis.recommend`), with the mislabelled-pair caveat;
- the reference log-probs with their fingerprint, which training reuses through `reference_logps_file` instead of a
  second reference pass.

Modules: `args` (parsing and every check made before loading), `data` (the train split, loaded as training loads it),
`score` (the trainer's precompute), `analysis` (the numbers and the verdict), `output` (audit.json, pairs.jsonl,
tables), `plots` (the figure; matplotlib optional).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

from .args import PLOT_FILE, REPORT_FILE, USER_ERROR, AuditError, AuditSettings, parse

__all__ = ["AuditError", "USER_ERROR", "main", "run_audit"]


def run_audit(settings: AuditSettings) -> dict:
    """Load the train split, run the precompute through the trainer, and write the audit; return `audit.json`'s
    payload."""
    from trl_cpo.reference_store import save_reference_logps
    from trl_cpo.report import reference_report

    from . import output, plots
    from .analysis import analyze
    from .data import load_train_split
    from .score import score

    dataset = load_train_split(settings)
    scored = score(settings, dataset)
    reference = scored.reference
    # The trainers' own call (`_ReferenceMarginTrainer._report`), on the same log-probs and config.
    report = reference_report(
        reference.chosen, reference.rejected, reference.chosen_lengths, reference.rejected_lengths, scored.config
    )
    numbers = analyze(reference, scored.config, settings.script.method, report)
    payload = output.report_json(settings, scored, report, numbers)
    if not scored.is_main_process:
        return payload
    for name in (REPORT_FILE, output.PAIRS_FILE, PLOT_FILE):  # an earlier audit's files (--overwrite_output_dir)
        path = os.path.join(settings.output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    save_reference_logps(
        settings.reference_file,
        reference,
        scored.fingerprint,
        info={"audit": os.path.abspath(settings.report_path), "method": settings.script.method},
    )
    pairs = output.pair_rows(scored, numbers)
    written = output.write_files(settings, payload, pairs)
    plot_path = os.path.join(settings.output_dir, PLOT_FILE)
    if plots.plot(plot_path, payload, pairs):
        written.append(plot_path)
    else:
        print(f"note: {plots.MISSING_MATPLOTLIB.format(file=PLOT_FILE)}.", file=sys.stderr)
    written.append(settings.reference_file)
    print(output.format_tables(payload))
    print("wrote " + ", ".join(written))
    print(f"train on it without a second reference pass: reference_logps_file: {settings.reference_file}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """`trl-cpo audit`: 0 on success, `USER_ERROR` (2) with one line on stderr for a user error."""
    try:
        with tempfile.TemporaryDirectory(prefix="trl-cpo-audit-") as work_dir, warnings.catch_warnings():
            # Deprecation notices transformers raises from TRL's configs and calls: nothing the user can act on here.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            settings = parse(argv, work_dir)
            for note in settings.notes:
                print(f"note: {note}", file=sys.stderr)
            run_audit(settings)
    except AuditError as error:
        print(f"trl-cpo audit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return USER_ERROR
    return 0
