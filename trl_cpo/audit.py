"""`trl-cpo audit`: measure, before training, how often a reference model prefers the rejected response.

DPO's loss is a margin ranking whose target is the reference log-odds ``delta_ref = logp_ref(y_w) - logp_ref(y_l)``.
On pairs where ``delta_ref < 0`` (the reference prefers the rejected response) DPO's equivalence with RLHF does not
hold: its loss can fall while the policy still prefers the rejected response (arXiv:2605.20834). The audit scores every
pair of a dataset with the reference and reports:

- the misalignment rate, the share of pairs with ``delta_ref < 0``;
- the distribution of ``delta_ref`` (quantiles, and a histogram);
- the CPO margins (on per-token reference probabilities, as the trainers compute them) and E-CPOC targets that given
  hyperparameters would produce on these pairs.

Tokenization, collation and the reference forward are TRL's own (a `trl.DPOTrainer` built around the loaded model,
read with `trl_cpo.reference.compute_reference_logps`), so the numbers are those a DPO / CPO run would see.

User errors (a missing file or column, an empty completion, a tokenizer without a pad token, ...) are printed as one
message naming the file, column or fix, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from typing import Any

#: Exit status of a run stopped by a user error (the same as argparse's for bad arguments).
USER_ERROR = 2
#: Quantiles reported for every per-pair quantity.
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
#: Suffixes read with `datasets.load_dataset` (compressed variants such as `.jsonl.gz` are accepted too).
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
#: Files written into `--output_dir`.
REPORT_FILE, HISTOGRAM_FILE, PAIRS_FILE = "audit.json", "delta_ref_hist.png", "pairs.jsonl"


class AuditError(Exception):
    """A problem with the user's input: reported as one message, without a traceback."""


# -- command line ------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .losses import DEFAULT_MAX_MARGIN, MARGIN_TYPES

    parser = argparse.ArgumentParser(
        prog="trl-cpo audit",
        description="Score every preference pair of a dataset with a reference model and report how often the "
        "reference prefers the rejected response (delta_ref < 0), the delta_ref distribution, and the CPO margins and "
        "E-CPOC targets that the given hyperparameters would produce. Flags share the names of the TRL / CPOConfig / "
        "ECPOCConfig fields they mirror. Writes a terminal table, "
        f"{REPORT_FILE}, {HISTOGRAM_FILE} and {PAIRS_FILE} (one line per pair) into --output_dir.",
    )
    data = parser.add_argument_group("inputs")
    data.add_argument(
        "--model_name_or_path", required=True, help="Local folder of the reference model and its tokenizer."
    )
    data.add_argument(
        "--dataset_name",
        required=True,
        help="Preference data: a .json/.jsonl/.parquet file (optionally compressed, e.g. .jsonl.gz) or a folder "
        "written by Dataset.save_to_disk / DatasetDict.save_to_disk. Columns 'chosen' and 'rejected', and optionally "
        "'prompt' (otherwise the shared beginning of chosen and rejected is the prompt, as in TRL); plain text or "
        "conversational (lists of {'role', 'content'} messages).",
    )
    data.add_argument(
        "--dataset_train_split",
        default="train",
        help="Split of a saved DatasetDict to audit, the one training would use (default: train).",
    )
    data.add_argument("--max_samples", type=_positive_int, help="Audit only the first N pairs.")
    data.add_argument(
        "--pad_token",
        help="Pad token to use when the tokenizer has none, e.g. its eos token. Padding is masked out, so the choice "
        "does not change the log-probs; the audit refuses to pick one silently.",
    )

    run = parser.add_argument_group("scoring")
    run.add_argument(
        "--precompute_ref_batch_size",
        type=_positive_int,
        default=8,
        help="Pairs per reference forward pass, as DPOConfig.precompute_ref_batch_size (default: 8).",
    )
    run.add_argument(
        "--max_length",
        type=int,
        default=1024,
        help="Truncate prompt+completion to this many tokens, as DPOConfig.max_length does (default: 1024; 0 for "
        "no truncation). Pairs whose prompt alone fills it are dropped, as in TRL.",
    )
    run.add_argument("--load_in_4bit", action="store_true", help="Load the model in 4-bit NF4 (bitsandbytes).")
    run.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Weights dtype (default: auto = bfloat16 on a GPU that supports it, float32 otherwise).",
    )
    run.add_argument(
        "--loss_type",
        default="sigmoid_norm",
        choices=["sigmoid_norm", "sigmoid"],
        help="Log-prob space of the report, as the training loss_type picks it: 'sigmoid_norm' averages per "
        "completion token (the CPOConfig default and the scale of the released code), 'sigmoid' sums (DPOConfig's "
        "default). The CPO margin is computed on per-token reference probabilities either way, as the trainers do. "
        "Default: sigmoid_norm.",
    )

    method = parser.add_argument_group("CPO / E-CPOC hyperparameters to preview")
    method.add_argument(
        "--cpo_gamma", type=float, default=0.05, help="CPO constraint strength (default: 0.05, the released setting)."
    )
    method.add_argument(
        "--cpo_margin_type", default="inverse_prob", choices=list(MARGIN_TYPES), help="CPO margin numerics."
    )
    method.add_argument(
        "--cpo_max_margin",
        type=float,
        default=DEFAULT_MAX_MARGIN,
        help=f"CPO margin cap (default: {DEFAULT_MAX_MARGIN}).",
    )
    method.add_argument("--ecpoc_gamma", type=float, default=0.5, help="E-CPOC target floor (default: 0.5).")
    method.add_argument(
        "--ecpoc_tau", type=float, default=2.0, help="E-CPOC sharpness (default: 2.0; 'inf' for a hard max)."
    )
    method.add_argument("--ecpoc_alpha", type=float, default=1.0, help="E-CPOC scale (default: 1.0).")

    parser.add_argument(
        "--output_dir", default="trl-cpo-audit", help="Where to write the report files (default: ./trl-cpo-audit)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_audit(args)
    except AuditError as error:
        print(f"trl-cpo audit: error: {error}", file=sys.stderr)
        return USER_ERROR
    return 0


# -- inputs ------------------------------------------------------------------------------------------------------------


def _file_format(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return FILE_FORMATS.get(os.path.splitext(name)[1])


def load_preference_dataset(path: str, split: str = "train"):
    """Read a preference dataset from a json/jsonl/parquet file or a `save_to_disk` folder; `AuditError` if unusable."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if not os.path.exists(path):
        raise AuditError(
            f"--dataset_name {path}: no such file or folder. Pass a .json, .jsonl or .parquet file, or a folder "
            "written by Dataset.save_to_disk."
        )
    if os.path.isdir(path):
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if not any(os.path.isfile(os.path.join(path, marker)) for marker in markers):
            raise AuditError(
                f"--dataset_name {path}: this folder was not written by Dataset.save_to_disk (it has none of "
                f"{', '.join(markers)}). Pass the data file itself (.json, .jsonl, .parquet) or a save_to_disk folder."
            )
        try:
            dataset = load_from_disk(path)
        except (OSError, ValueError) as error:
            raise AuditError(f"--dataset_name {path}: could not load this save_to_disk folder: {error}") from None
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise AuditError(
                    f"--dataset_name {path} has no split {split!r}; its splits are {sorted(dataset)}. Choose one with "
                    "--dataset_train_split."
                )
            dataset = dataset[split]
        if not isinstance(dataset, Dataset):
            raise AuditError(
                f"--dataset_name {path}: expected a Dataset or DatasetDict, got {type(dataset).__name__}."
            )
        return dataset
    builder = _file_format(path)
    if builder is None:
        raise AuditError(
            f"--dataset_name {path}: unsupported file type. Use .json, .jsonl or .parquet (optionally compressed, "
            "e.g. .jsonl.gz), or a folder written by Dataset.save_to_disk."
        )
    try:
        return load_dataset(builder, data_files=os.path.abspath(path), split="train")
    except Exception as error:  # noqa: BLE001 - any reader failure on a user file is a user error
        cause = error.__cause__ or error
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise AuditError(
            f"--dataset_name {path}: could not be read as {builder} ({type(cause).__name__}: {detail}). Check that "
            f"the file is valid {builder}{' with one JSON object per line' if path.endswith('l') else ''} and that "
            "every row has the same columns and types."
        ) from None


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        if "content" in value:
            return _is_empty(value["content"])
        if "text" in value:
            return _is_empty(value["text"])
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_empty(item) for item in value)
    return False


def prepare_pairs(dataset, path: str):
    """Check the preference data with the trainers' validator (`trl_cpo.data`) and make the prompt explicit, as TRL
    would."""
    from trl.data_utils import extract_prompt

    from .data import validate_preference_dataset

    try:
        validate_preference_dataset(dataset, f"--dataset_name {path}")
    except ValueError as error:
        raise AuditError(str(error)) from None
    if "prompt" not in dataset.column_names:
        # Implicit prompt: the shared beginning of chosen and rejected, split off exactly as DPOTrainer does.
        dataset = dataset.map(extract_prompt, desc="Extracting the implicit prompt")
    return dataset


def load_tokenizer(model_path: str, pad_token: str | None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise AuditError(f"--model_name_or_path {model_path}: could not load its tokenizer: {error}") from None
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise AuditError(
                f"--pad_token {pad_token!r} is not in the vocabulary of the tokenizer in {model_path}. Use one of its "
                f"tokens, e.g. its eos token {tokenizer.eos_token!r}."
            )
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        suggestion = f" --pad_token {tokenizer.eos_token!r} (its eos token, which TRL would use silently)"
        raise AuditError(
            f"The tokenizer in {model_path} has no pad token. Pass one with"
            f"{suggestion if tokenizer.eos_token else ' --pad_token TOKEN'} (padding is masked out, so the choice "
            "does not change the audit), or set tokenizer.pad_token and save the tokenizer to the model folder."
        )
    return tokenizer


def check_model_dir(model_path: str) -> None:
    if not os.path.isdir(model_path):
        raise AuditError(
            f"--model_name_or_path {model_path}: no such folder. Pass a local folder saved with "
            "model.save_pretrained(...) and tokenizer.save_pretrained(...)."
        )
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise AuditError(
            f"--model_name_or_path {model_path}: not a model folder (no config.json). Pass a folder saved with "
            "model.save_pretrained(...) and tokenizer.save_pretrained(...)."
        )


def load_model(model_path: str, *, dtype: str, load_in_4bit: bool):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        if torch.cuda.is_available():
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except ImportError as error:
        raise AuditError(
            f"--load_in_4bit needs bitsandbytes: pip install 'trl-cpo[quantization]' ({error})."
        ) from None
    except (OSError, ValueError) as error:
        raise AuditError(f"--model_name_or_path {model_path}: could not load the model: {error}") from None


def resolve_dtype(name: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# -- scoring -----------------------------------------------------------------------------------------------------------


def score_pairs(model, tokenizer, dataset, *, batch_size: int, max_length: int | None, work_dir: str):
    """Reference log-probs of every pair, with TRL's tokenization and reference forward; rows kept, in order.

    A `trl.DPOTrainer` is built around the model with a rank-1 LoRA adapter that is never trained: with an adapter and
    no `ref_model`, DPOTrainer reads the reference by disabling the adapter, i.e. from the loaded weights themselves,
    without loading a second copy (and 4-bit models are accepted, as in QLoRA).
    """
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from .reference import compute_reference_logps

    config = DPOConfig(
        output_dir=work_dir,
        precompute_ref_log_probs=False,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        max_length=max_length,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        disable_dropout=True,
        save_strategy="no",
    )
    dataset = dataset.add_column("audit_row", list(range(len(dataset))))
    trainer = DPOTrainer(
        model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=1, lora_alpha=1, target_modules="all-linear", lora_dropout=0.0),
    )
    prepared = trainer.train_dataset
    if len(prepared) == 0:
        raise AuditError(
            f"Every pair's prompt fills --max_length {max_length}, so no completion token is left to score. Raise "
            "--max_length (or pass 0 for no truncation)."
        )
    trainer.model.eval()
    reference = compute_reference_logps(trainer, prepared, batch_size=batch_size, desc="Scoring pairs")
    rows = prepared["audit_row"]
    full_lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
    ]
    truncated = sum(length > max_length for length in full_lengths) if max_length else 0
    return reference, rows, truncated, trainer.accelerator


# -- report ------------------------------------------------------------------------------------------------------------


def summarize(values) -> dict[str, float]:
    import torch

    values = values.double()
    quantiles = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
    summary = {"mean": values.mean().item(), "std": values.std().item() if values.numel() > 1 else 0.0}
    summary["min"] = values.min().item()
    summary.update({f"q{round(q * 100):02d}": v for q, v in zip(QUANTILES, quantiles.tolist())})
    summary["max"] = values.max().item()
    return summary


def recommendation(rate: float, space: str, *, tie_fraction: float = 0.0, truncated_fraction: float = 0.0) -> str:
    caveats = ""
    if tie_fraction > 0:
        caveats += (
            f" {100 * tie_fraction:.1f}% of pairs are ties (delta_ref = 0: chosen and rejected score the same, e.g. "
            "identical after truncation) and count as neither; check them in pairs.jsonl."
        )
    if truncated_fraction > 0.2:
        caveats += (
            f" {100 * truncated_fraction:.1f}% of pairs were truncated by --max_length, so these numbers describe "
            "truncated completions; raise --max_length to audit what training will see at a longer length."
        )
    share = f"misalignment rate {100 * rate:.1f}% ({space} log-probs)"
    if rate == 0:
        every = "every pair" if tie_fraction == 0 else "every pair that is not a tie"
        return (
            f"{share}: the reference prefers the chosen response on {every}, so DPO's equivalence assumption holds "
            "on this data; CPO's margin would still add its constraint, but DPO has no undesirable solutions to fall "
            "into here." + caveats
        )
    consequence = (
        f"{share}: DPO's equivalence assumption is violated on this share of pairs (the reference prefers the "
        "rejected response), where DPO can lower its loss while the policy still prefers the rejected response."
    )
    # The 5% / 20% thresholds are rules of thumb for the wording, not values from the paper.
    if rate < 0.05:
        advice = (
            " Few pairs are affected, so DPO's assumption holds on most of this data; if you train with DPO, watch "
            "eval_u_fraction (trl_cpo.callbacks.UFractionCallback)."
        )
    elif rate < 0.2:
        advice = (
            " Consider CPOTrainer (cpo_gamma 0.05) or ECPOCTrainer, or at least watch eval_u_fraction with "
            "trl_cpo.callbacks.UFractionCallback."
        )
    else:
        advice = (
            " This is a large share (the paper measured 45.5% on Llama-3-8B-Instruct / UltraFeedback): CPOTrainer "
            "(cpo_gamma 0.05) or ECPOCTrainer is advised, and eval_u_fraction (UFractionCallback) is worth watching."
        )
    return consequence + advice + caveats


def _loss_kwargs(method, args) -> dict[str, Any]:
    """The method's hyperparameters from the parsed flags (named as its config fields), as its loss functions name
    them (`Method.fields`: e.g. cpo_gamma -> gamma)."""
    return {method.fields[field]: value for field, value in method.settings(args).items()}


def build_report(args, reference, rows: list[int], num_input: int, truncated: int) -> tuple[dict, dict]:
    """The JSON report and the per-pair arrays (in the log-prob space `args.loss_type` picks).

    The CPO margin is computed on per-token reference log-probs whatever that space, as the trainers compute it.
    """
    from .logps import is_length_normalized
    from .losses import cpo_margin, ecpoc_target
    from .methods import METHODS
    from .metrics import ref_misaligned_fraction

    length_normalized = is_length_normalized(args.loss_type)
    chosen, rejected = reference.in_loss_space(length_normalized)
    delta_ref = chosen - rejected
    margin = cpo_margin(*reference.per_token(), **_loss_kwargs(METHODS["cpo"], args))
    target = ecpoc_target(chosen, rejected, **_loss_kwargs(METHODS["ecpoc"], args))
    space = "length-normalized" if length_normalized else "summed"
    rate = ref_misaligned_fraction(chosen, rejected).item()
    tie_fraction = (delta_ref == 0).float().mean().item()
    other = reference.in_loss_space(not length_normalized)
    report = {
        "model": os.path.abspath(args.model_name_or_path),
        "dataset": os.path.abspath(args.dataset_name),
        "split": args.dataset_train_split if os.path.isdir(args.dataset_name) else None,
        "num_pairs_input": num_input,
        "num_pairs_scored": len(rows),
        "num_pairs_dropped": num_input - len(rows),
        "num_pairs_truncated": truncated,
        "max_length": args.max_length or None,
        "loss_type": args.loss_type,
        "log_prob_space": space,
        "misalignment_rate": rate,
        "misalignment_rate_by_space": {
            space: rate,
            ("summed" if length_normalized else "length-normalized"): ref_misaligned_fraction(*other).item(),
        },
        "delta_ref": summarize(delta_ref),
        "cpo": {
            **METHODS["cpo"].settings(args),
            "margin_space": "per-token",
            "margin": summarize(margin),
            "capped_fraction": (margin.abs() >= args.cpo_max_margin * (1 - 1e-6)).float().mean().item(),
        },
        "ecpoc": {
            **METHODS["ecpoc"].settings(args),
            "ecpoc_tau": args.ecpoc_tau if math.isfinite(args.ecpoc_tau) else str(args.ecpoc_tau),
            "target": summarize(target),
            "floor_binding_fraction": (delta_ref < args.ecpoc_gamma).float().mean().item(),
        },
        "tie_fraction": tie_fraction,
        "recommendation": recommendation(
            rate, space, tie_fraction=tie_fraction, truncated_fraction=truncated / max(len(rows), 1)
        ),
    }
    pairs = {
        "row": rows,
        "chosen_logp": chosen.tolist(),
        "rejected_logp": rejected.tolist(),
        "chosen_tokens": reference.chosen_lengths.long().tolist(),
        "rejected_tokens": reference.rejected_lengths.long().tolist(),
        "delta_ref": delta_ref.tolist(),
        "cpo_margin": margin.tolist(),
        "ecpoc_target": target.tolist(),
    }
    return report, pairs


def format_table(report: dict) -> str:
    columns = ["min", "q01", "q05", "q25", "q50", "q75", "q95", "q99", "max", "mean"]
    headers = ["min", "1%", "5%", "25%", "median", "75%", "95%", "99%", "max", "mean"]
    cpo, ecpoc = report["cpo"], report["ecpoc"]
    rows = [("delta_ref", report["delta_ref"]), ("CPO margin", cpo["margin"]), ("E-CPOC target", ecpoc["target"])]
    pairs = f"{report['num_pairs_scored']} scored"
    if report["max_length"]:
        pairs += (
            f", {report['num_pairs_dropped']} dropped (prompt fills max_length={report['max_length']}), "
            f"{report['num_pairs_truncated']} truncated"
        )
    lines = [
        f"model    {report['model']}",
        f"dataset  {report['dataset']}" + (f" (split {report['split']})" if report["split"] else ""),
        f"pairs    {pairs}",
        f"space    {report['log_prob_space']} log-probs",
        f"CPO      cpo_gamma={cpo['cpo_gamma']:g}, cpo_margin_type={cpo['cpo_margin_type']}, "
        f"cpo_max_margin={cpo['cpo_max_margin']:g} (margin on per-token reference probabilities)",
        f"E-CPOC   ecpoc_gamma={ecpoc['ecpoc_gamma']:g}, ecpoc_tau={float(ecpoc['ecpoc_tau']):g}, "
        f"ecpoc_alpha={ecpoc['ecpoc_alpha']:g}",
        "",
        " " * 15 + "".join(f"{h:>9}" for h in headers),
    ]
    for name, summary in rows:
        lines.append(f"{name:<15}" + "".join(f"{summary[c]:>9.3g}" for c in columns))
    by_space = ", ".join(f"{s}: {100 * r:.1f}%" for s, r in report["misalignment_rate_by_space"].items())
    lines += [
        "",
        f"misalignment rate (delta_ref < 0)              {100 * report['misalignment_rate']:5.1f}%   ({by_space})",
        f"E-CPOC floor active (delta_ref < ecpoc_gamma)  {100 * ecpoc['floor_binding_fraction']:5.1f}% of pairs",
        f"CPO margin at its cap (cpo_max_margin)         {100 * cpo['capped_fraction']:5.1f}% of pairs",
        "",
        f"recommendation: {report['recommendation']}",
    ]
    return "\n".join(lines)


def plot_histogram(path: str, report: dict, pairs: dict) -> bool:
    """Write the delta_ref histogram (and the CPO margin's); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    delta_ref, margin = pairs["delta_ref"], pairs["cpo_margin"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = min(60, max(10, len(delta_ref) // 5))
    import numpy as np

    edges = np.histogram_bin_edges(delta_ref, bins=bins)
    negative = [d for d in delta_ref if d < 0]
    positive = [d for d in delta_ref if d >= 0]
    left.hist(
        [negative, positive],
        bins=edges,
        stacked=True,
        color=["#c44e52", "#4c72b0"],
        label=["delta_ref < 0 (reference prefers rejected)", "delta_ref >= 0"],
    )
    left.axvline(0.0, color="black", linestyle="--", linewidth=1)
    left.set_title(f"Reference log-odds: {100 * report['misalignment_rate']:.1f}% of pairs below 0")
    left.set_xlabel(f"delta_ref = logp_ref(y_w) - logp_ref(y_l)  ({report['log_prob_space']})")
    left.set_ylabel("pairs")
    left.legend()
    cpo = report["cpo"]
    right.hist(margin, bins=bins, color="#55a868")
    right.set_title(f"CPO margin (cpo_gamma={cpo['cpo_gamma']:g}, {cpo['cpo_margin_type']})")
    right.set_xlabel("m (logit units, from per-token reference probabilities)")
    fig.suptitle(
        os.path.basename(os.path.normpath(report["dataset"]))
        + " scored by "
        + os.path.basename(os.path.normpath(report["model"]))
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(output_dir: str, report: dict, pairs: dict) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    written = []
    path = os.path.join(output_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    written.append(path)
    path = os.path.join(output_dir, PAIRS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        for values in zip(*pairs.values()):
            f.write(json.dumps(dict(zip(pairs.keys(), values))) + "\n")
    written.append(path)
    path = os.path.join(output_dir, HISTOGRAM_FILE)
    if plot_histogram(path, report, pairs):
        written.append(path)
    else:
        print(f"(matplotlib is not installed: no {HISTOGRAM_FILE}; pip install matplotlib)", file=sys.stderr)
    return written


def check_hyperparameters(args: argparse.Namespace) -> None:
    """Fail before any loading if the CPO / E-CPOC hyperparameters to preview are unusable."""
    from .losses import check_margin_hyperparameters, check_target_hyperparameters

    try:
        check_margin_hyperparameters(
            gamma=args.cpo_gamma, margin_type=args.cpo_margin_type, max_margin=args.cpo_max_margin, prefix="cpo_"
        )
    except ValueError as error:
        raise AuditError(f"CPO preview (--cpo_gamma, --cpo_margin_type, --cpo_max_margin): {error}") from None
    try:
        check_target_hyperparameters(
            gamma=args.ecpoc_gamma, tau=args.ecpoc_tau, alpha=args.ecpoc_alpha, prefix="ecpoc_"
        )
    except ValueError as error:
        raise AuditError(f"E-CPOC preview (--ecpoc_gamma, --ecpoc_tau, --ecpoc_alpha): {error}") from None


def run_audit(args: argparse.Namespace) -> dict:
    """Run the audit for parsed arguments; return the report (also printed and written to `args.output_dir`)."""
    check_hyperparameters(args)
    if args.max_length < 0:
        raise AuditError(f"--max_length {args.max_length}: must be >= 0 (0 for no truncation).")
    check_model_dir(args.model_name_or_path)
    dataset = load_preference_dataset(args.dataset_name, args.dataset_train_split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    dataset = prepare_pairs(dataset, args.dataset_name)
    tokenizer = load_tokenizer(args.model_name_or_path, args.pad_token)
    from trl.data_utils import is_conversational

    if is_conversational(dataset[0]) and tokenizer.chat_template is None:
        raise AuditError(
            f"--dataset_name {args.dataset_name} is conversational but the tokenizer in {args.model_name_or_path} has "
            "no chat template. Use the model's chat tokenizer (one with tokenizer.chat_template set), or convert the "
            "data to plain text."
        )
    model = load_model(args.model_name_or_path, dtype=args.dtype, load_in_4bit=args.load_in_4bit)
    with tempfile.TemporaryDirectory(prefix="trl-cpo-audit-") as work_dir, warnings.catch_warnings():
        # Deprecation notices that transformers raises from inside TRL's own calls: nothing the user can act on.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        reference, rows, truncated, accelerator = score_pairs(
            model,
            tokenizer,
            dataset,
            batch_size=args.precompute_ref_batch_size,
            max_length=args.max_length or None,
            work_dir=work_dir,
        )
    report, pairs = build_report(args, reference, rows, len(dataset), truncated)
    report["num_processes"] = accelerator.num_processes
    if accelerator.is_main_process:
        written = write_outputs(args.output_dir, report, pairs)
        print(format_table(report))
        print("wrote    " + ", ".join(written))
    return report


if __name__ == "__main__":
    sys.exit(main())
