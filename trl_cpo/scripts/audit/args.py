"""Arguments of `trl-cpo audit`: parsed with `TrlParser` and checked before any data or model loads.

The audit reads the training run's own arguments, parsed as `trl-cpo train` parses them (`--method` first, then
`trl_cpo.scripts._method_args.parse`): the train script's `CPOScriptArguments`, the method's config class, TRL's
`ModelConfig` and `DatasetMixtureConfig`, plus `AuditArguments`. So `trl-cpo audit --config <the training YAML>` takes
the training run's model, tokenizer, `max_length`, method and method settings. `output_dir` is where the audit writes;
taken from the training YAML it is the training run's folder, so the audit's files sit next to the run they describe.

Every user error raises `AuditError` with one line naming the flag and the fix; `trl-cpo audit` prints it and exits
with status 2 (`USER_ERROR`), without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, TrlParser

from trl_cpo.dataset_loading import mixture_files
from trl_cpo.methods import METHODS, Method
from trl_cpo.reference_store import DEFAULT_FILE_NAME
from trl_cpo.scripts import _method_args
from trl_cpo.scripts.train import CPOScriptArguments

logger = logging.getLogger(__name__)

#: Exit status of a run stopped by a user error (argparse's for bad arguments).
USER_ERROR = 2
#: Files the audit writes into `--output_dir` (the reference log-probs go to `reference_logps_file` if it is set).
REPORT_FILE, PAIRS_FILE, PLOT_FILE = "audit.json", "pairs.jsonl", "delta_ref.png"
DEFAULT_OUTPUT_DIR = "trl-cpo-audit"


class AuditError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


@dataclass
class AuditArguments:
    """The audit's own arguments (the rest are the training run's)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier audit's files in --output_dir (audit.json, pairs.jsonl, delta_ref.png, the "
            "reference log-probs file). A file that is one of the audit's inputs is never replaced."
        },
    )
    max_samples: int | None = field(
        default=None,
        metadata={
            "help": "Audit only the first N pairs of the train split. The reference log-probs file then covers those "
            "N pairs only, so a training run on the full split will not take it."
        },
    )


def _raw_post_init(self) -> None:
    """Raw container: the method's config class validates the values once, in `trainer_config`."""


@functools.cache
def audit_config_class(method_name: str) -> type:
    """The training arguments as the audit parses them: `method_name`'s config class, with `output_dir` and
    `reference_logps_file` described as the audit uses them, and no `__post_init__` (the audit's overrides go in before
    the config checks anything; `trainer_config` builds the real config)."""
    base = METHODS[method_name].config_class
    fields = [
        (
            "output_dir",
            "str | None",
            field(
                default=None,
                metadata={
                    "help": f"Folder for the audit's files ({REPORT_FILE}, {PAIRS_FILE}, {PLOT_FILE}, "
                    f"{DEFAULT_FILE_NAME}); created if missing. Default: the training config's output_dir, else "
                    f"./{DEFAULT_OUTPUT_DIR}."
                },
            ),
        ),
        (
            "reference_logps_file",
            "str | None",
            field(
                default=None,
                metadata={
                    "help": f"Where the audit writes the train set's reference log-probs (default: --output_dir/"
                    f"{DEFAULT_FILE_NAME}). Set in the training YAML, the same path is what training reads, so the "
                    "reference runs once."
                },
            ),
        ),
    ]
    namespace = {"__post_init__": _raw_post_init, "__module__": __name__}
    return dataclasses.make_dataclass(f"Audit{base.__name__}", fields, bases=(base,), namespace=namespace)


def trainer_config(raw, method: Method, work_dir: str) -> DPOConfig:
    """The config training uses for `method`, built from the parsed values, with what only a training run needs
    switched off: no saving, logging, evaluation or push; `output_dir` a scratch folder; no reference file (the audit
    writes it)."""
    values = {f.name: getattr(raw, f.name) for f in dataclasses.fields(method.config_class) if f.init}
    values.update(
        output_dir=work_dir,
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        push_to_hub=False,
        load_best_model_at_end=False,
        metric_for_best_model=None,
        reference_logps_file=None,
    )
    return method.config_class(**values)


class _AuditParser(TrlParser):
    def error(self, message: str):  # argparse's usage + exit(2), as one line naming the flag instead
        raise AuditError(f"{message} (see trl-cpo audit --help)")


def make_parser(method: Method = METHODS[CPOScriptArguments.method], other_settings=()) -> TrlParser:
    training = audit_config_class(method.name)
    return _AuditParser(
        (AuditArguments, CPOScriptArguments, training, ModelConfig, DatasetMixtureConfig, *other_settings),
        prog="trl-cpo audit",
        description="Score every training pair with the reference before training, as the training run will (same "
        "model, tokenizer, truncation and method settings: pass the training YAML with --config), and report how "
        "often the reference prefers the rejected response, in both log-prob spaces, what the method's settings do "
        f"to those pairs, and what to do. Writes {REPORT_FILE}, {PAIRS_FILE}, {PLOT_FILE} and the reference "
        "log-probs (reused by training through reference_logps_file).",
    )


@dataclass
class AuditSettings:
    """Everything the audit needs, checked."""

    audit: AuditArguments
    script: CPOScriptArguments
    model: ModelConfig
    datasets: DatasetMixtureConfig
    #: The training config of `--method` (CPOConfig or ECPOCConfig), with the audit's overrides.
    trainer_config: DPOConfig
    method: Method
    output_dir: str
    reference_file: str
    #: One-line notes for the user, printed before the audit runs.
    notes: list[str]

    @property
    def report_path(self) -> str:
        return os.path.join(self.output_dir, REPORT_FILE)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _flag_error(error: Exception) -> AuditError:
    """A config's ValueError ("cpo_gamma=-1 is invalid: ...") as an AuditError that starts with the flag."""
    message = _one_line(str(error))
    match = re.match(r"[`']?(\w+)[`']?\s*=", message)
    return AuditError(f"--{match.group(1)}: {message}" if match else message)


def _parse(argv: list[str] | None):
    argv = list(argv) if argv is not None else None
    if argv is not None and "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise AuditError("--config needs a path: --config <the training YAML>.")
        path = argv[index + 1]
        if not os.path.isfile(path):
            raise AuditError(f"--config {path}: no such file. Pass the training run's YAML file.")
    try:
        return _method_args.parse(
            make_parser,
            argv,
            default=CPOScriptArguments.method,
            return_remaining_strings=True,
            separate_remaining_strings=True,
        )
    except AuditError:
        raise
    except ImportError:
        raise
    except Exception as error:  # noqa: BLE001 - YAML and dataclass errors on user input
        if type(error).__module__.startswith("yaml"):
            raise AuditError(f"--config: not a valid YAML file ({_one_line(str(error))[:200]}).") from None
        if str(error).startswith("Config file"):
            raise AuditError(f"--config: {_one_line(str(error))} Write one field: value line per setting.") from None
        if isinstance(error, (ValueError, TypeError)):
            raise _flag_error(error) from None
        raise


def _check_model(path: str | None) -> None:
    if not path:
        raise AuditError(
            "--model_name_or_path is required: the reference model (a local folder or a Hub id), on the command line "
            "or as model_name_or_path: in the --config YAML."
        )
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise AuditError(
                f"--model_name_or_path {path}: not a model folder (no config.json). Pass a folder saved with "
                "model.save_pretrained(...) and tokenizer.save_pretrained(...), or a Hub id."
            )


def _probe_writable(folder: str, flag: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".trl-cpo-audit-probe-"):
            pass
    except OSError as error:
        raise AuditError(
            f"{flag} {folder}: cannot write there ({error.strerror or error}). Choose a folder you can write to."
        ) from None


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _input_clash(path: str, inputs: list[tuple[str, str]]) -> str | None:
    """The input (`flag value`) that writing `path` would overwrite: an input file itself, an existing file in the
    model folder, or anything inside a dataset folder (a new file there would join the data). None if none."""
    for flag, value in inputs:
        source = os.path.expanduser(value)
        if not os.path.exists(source):
            continue
        if os.path.isdir(source):
            if _inside(path, source) and (flag != "--model_name_or_path" or os.path.exists(path)):
                return f"{flag} {value}"
        elif os.path.exists(path) and os.path.samefile(path, source):
            return f"{flag} {value}"
    return None


def check_output(output_dir: str, reference_file: str, overwrite: bool, inputs: list[tuple[str, str]] = ()) -> None:
    """Refuse an output folder that is a file or not writable; a file the audit would write that is one of its
    `inputs` (`(flag, path)`: the data, the config, the model), even with `overwrite`; and one that already exists
    (an earlier audit's), unless `overwrite`."""
    for path, flag in ((output_dir, "--output_dir"), (os.path.dirname(os.path.abspath(reference_file)), None)):
        if os.path.exists(path) and not os.path.isdir(path):
            flag = flag or "--reference_logps_file"
            raise AuditError(f"{flag} {path} is a file, not a folder: pass a folder path (created if missing).")
    if os.path.isdir(reference_file):
        raise AuditError(
            f"--reference_logps_file {reference_file} is a folder: give a file path, e.g. "
            f"{os.path.join(reference_file, DEFAULT_FILE_NAME)}."
        )
    written = [(os.path.join(output_dir, name), "--output_dir") for name in (REPORT_FILE, PAIRS_FILE, PLOT_FILE)]
    written.append((reference_file, "--reference_logps_file"))
    for path, flag in written:
        clash = _input_clash(path, list(inputs))
        if clash is not None:
            raise AuditError(
                f"{flag}: the audit would write {path}, which is its input {clash}; it never writes over its inputs, "
                f"even with --overwrite_output_dir. Choose another {flag}."
            )
    earlier = [path for path, _ in written if os.path.exists(path)]
    if earlier and not overwrite:
        raise AuditError(
            f"--output_dir {output_dir} already holds files the audit writes ({', '.join(earlier)}): pass "
            "--overwrite_output_dir true to replace them, or choose another --output_dir (or --reference_logps_file)."
        )
    _probe_writable(output_dir, "--output_dir")
    _probe_writable(os.path.dirname(os.path.abspath(reference_file)), "--reference_logps_file")


def config_path(argv: list[str] | None) -> str | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    index = argv.index("--config") if "--config" in argv else -1
    return argv[index + 1] if 0 <= index < len(argv) - 1 else None


def _unknown_keys(path: str | None, keys: list[str], method: Method) -> str:
    """`trl-cpo train` refuses a config with keys no argument reads; the audit reads the same arguments and refuses
    them too, suggesting the closest option."""
    known = [action.dest for action in make_parser(method, _method_args.other_settings_types(method.name))._actions]
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return (
        f"--config {path}: unknown key(s) {', '.join(hints)}. No option of --method {method.name} reads them, and "
        "trl-cpo train refuses the same file: fix or remove them."
    )


def _inputs(argv, script, datasets, model) -> list[tuple[str, str]]:
    """What the audit reads, as (flag, path): the config file, the local data, the model folder."""
    inputs = [("--config", config_path(argv)), ("--dataset_name", script.dataset_name)]
    inputs += [("--datasets", path) for path in mixture_files(datasets)] if datasets.datasets else []
    inputs.append(("--model_name_or_path", model.model_name_or_path))
    return [(flag, str(path)) for flag, path in inputs if path]


def parse(argv: list[str] | None, work_dir: str) -> AuditSettings:
    """Parse and check the arguments; `AuditError` on the first problem. Loads no data and no model."""
    method, parsed, ignored = _parse(argv)
    audit, script, raw, model, datasets, config_leftover, cli_leftover = parsed
    if ignored:
        logger.warning(ignored)
    notes = []
    if cli_leftover:
        raise AuditError(f"unrecognized arguments: {' '.join(cli_leftover)} (see trl-cpo audit --help).")
    if config_leftover:
        raise AuditError(_unknown_keys(config_path(argv), [item[2:] for item in config_leftover[::2]], method))
    if script.method not in METHODS:
        raise AuditError(f"--method {script.method!r} is unknown: use one of {list(METHODS)}.")
    _check_model(model.model_name_or_path)
    if not script.dataset_name and not datasets.datasets:
        raise AuditError(
            "--dataset_name is required: the training data (a local .json/.jsonl/.parquet/.csv file, a save_to_disk "
            "folder or a Hub name), or a datasets: mixture in the --config YAML."
        )
    if script.dataset_streaming or datasets.streaming:
        raise AuditError(
            "--dataset_streaming: the audit scores every pair and needs a map-style dataset (as training does); drop "
            "dataset_streaming / streaming."
        )
    if audit.max_samples is not None and (not isinstance(audit.max_samples, int) or audit.max_samples <= 0):
        raise AuditError(f"--max_samples {audit.max_samples}: must be a positive integer, or unset for every pair.")
    try:
        config = trainer_config(raw, method, work_dir)
    except (ValueError, TypeError) as error:
        raise _flag_error(error) from None
    output_dir = raw.output_dir or DEFAULT_OUTPUT_DIR
    reference_file = raw.reference_logps_file or os.path.join(output_dir, DEFAULT_FILE_NAME)
    check_output(output_dir, reference_file, audit.overwrite_output_dir, _inputs(argv, script, datasets, model))
    return AuditSettings(
        audit=audit,
        script=script,
        model=model,
        datasets=datasets,
        trainer_config=config,
        method=method,
        output_dir=output_dir,
        reference_file=reference_file,
        notes=notes,
    )
