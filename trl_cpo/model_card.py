"""The model card the trainers write (`create_model_card`, and `push_to_hub` through it), and the Hub dry run.

The card is TRL's: `DPOTrainer.create_model_card` renders TRL's template (quick start, tracker badges, framework
versions, the method's citation and TRL's), and `extend_model_card` adds to it what TRL's card cannot say:

- the "Training procedure" gets the method's section: what it is, its settings, the reference report computed at the
  precompute, the first and last `u_fraction` the run logged, and the diagnostics at the end of training
  (`trl_cpo.diagnostics.card_section`); "Framework versions" names trl-cpo's (and PEFT's) version;
- `base_model:` metadata and a link only when the base is a Hub id: the model's own `_name_or_path` when it is one, or
  the `base_model_id` the user names for a model loaded from a local folder. A local base without one is said to be
  local, without a link (TRL's card would link `huggingface.co/None`);
- `datasets:` metadata and links only for names that are Hub ids; a local file or folder is named, not linked;
- `license:` from the `license` argument, else from the base model's own card (its README.md in the local folder or,
  for a Hub id, fetched from the Hub unless `HF_HUB_OFFLINE` is set), else left out (TRL's card writes a bogus
  `licence: license` key, removed); `library_name: peft` for an adapter.

The lines of TRL's card this relies on are `trl_cpo._trl_compat.TRL_CARD_*` (contract-tested); where one is missing
(a TRL whose template changed), the section is appended at the end instead and a warning says so.

`write_hub_dry_run` writes the folder `push_to_hub` would upload, without a network.
"""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
from pathlib import Path

from . import _trl_compat

logger = logging.getLogger(__name__)

PAPER_ID = "2605.20834"
PAPER_TITLE = "Conditional Equivalence of DPO and RLHF: Implicit Assumption, Failure Modes, and Provable Alignment"
CITATION = textwrap.dedent("""\
    @inproceedings{yang2026conditional,
        title     = {{Conditional Equivalence of DPO and RLHF: Implicit Assumption, Failure Modes, and Provable Alignment}},
        author    = {Yang and Zhang and Xue and Fang and Han and Guo},
        year      = 2026,
        booktitle = {Proceedings of the 43rd International Conference on Machine Learning (ICML)},
        eprint    = {2605.20834},
        archivePrefix = {arXiv},
    }""")
NAMING_NOTE = (
    "CPO here is *Constrained* Preference Optimization (arXiv:2605.20834), not TRL's Contrastive Preference "
    "Optimization (Xu et al. 2024, `trl.experimental.cpo`), which shares the acronym but is a different algorithm."
)

#: Folder (under `output_dir`) the Hub dry run writes. Its leading underscore matches the "_*" pattern
#: `Trainer.push_to_hub` ignores, so a later real push of `output_dir` never uploads it.
HUB_DRY_RUN_DIR = "_hub_dry_run"
#: What `Trainer.push_to_hub` passes to `upload_folder` as `ignore_patterns` (transformers 5.23, trainer.py:4419:
#: `["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]`); huggingface_hub adds its `DEFAULT_IGNORE_PATTERNS` (.git, .cache).
TRAINER_PUSH_IGNORE_PATTERNS = _trl_compat.PUSH_IGNORE_PATTERNS


# ----------------------------------------------------------------------------------------------------------------------
# What the card says
# ----------------------------------------------------------------------------------------------------------------------


def hub_repo_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (`name` or `namespace/name`) and is not an existing local path, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(os.path.expanduser(str(name))):
        return None
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return None
    return str(name)


def _local_name(path: str) -> str:
    return os.path.basename(os.path.normpath(str(path))) or str(path)


def resolve_base_model(name_or_path: str | None, base_model_id: str | None = None) -> tuple[str | None, str]:
    """(Hub id for the `base_model:` metadata or None, the markdown that names the base model on the card)."""
    if base_model_id is not None:
        if hub_repo_id(base_model_id) is None:
            raise ValueError(
                f"base_model_id={base_model_id!r} is not a Hub model id: name the Hub repository the base model "
                "came from, as 'namespace/name' (e.g. meta-llama/Meta-Llama-3-8B-Instruct), or leave it unset."
            )
        return base_model_id, f"[{base_model_id}](https://huggingface.co/{base_model_id})"
    hub_id = hub_repo_id(name_or_path)
    if hub_id is not None:
        return hub_id, f"[{hub_id}](https://huggingface.co/{hub_id})"
    if name_or_path:
        return None, (
            f"a model loaded from the local folder `{_local_name(name_or_path)}` (not on the Hub; name the Hub id it "
            "came from with `base_model_id`)"
        )
    return None, "a model of unrecorded origin"


def resolve_datasets(dataset_name: str | list[str] | None) -> tuple[list[str], list[str]]:
    """(Hub ids for the `datasets:` metadata, the markdown naming each dataset: linked only when a Hub id)."""
    names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    hub_ids, shown = [], []
    for name in dict.fromkeys(names):
        hub_id = hub_repo_id(name)
        if hub_id is not None:
            hub_ids.append(hub_id)
            shown.append(f"[{hub_id}](https://huggingface.co/datasets/{hub_id})")
        else:
            shown.append(f"the local dataset `{_local_name(name)}`")
    return hub_ids, shown


def base_model_license(name_or_path: str | None, base_hub_id: str | None) -> str | None:
    """The `license:` of the base model's own card: its README.md in a local folder, or on the Hub for a Hub id
    (fetched unless `HF_HUB_OFFLINE` is set; any failure leaves the license unknown)."""
    from huggingface_hub import ModelCard, constants, hf_hub_download

    readme = None
    if name_or_path and os.path.isfile(os.path.join(str(name_or_path), "README.md")):
        readme = os.path.join(str(name_or_path), "README.md")
    elif base_hub_id is not None and not constants.HF_HUB_OFFLINE:
        try:
            readme = hf_hub_download(base_hub_id, "README.md")
        except Exception as error:  # gated, missing, no network: the card just has no license
            logger.info("No license read from %s's card (%s).", base_hub_id, error)
    if readme is None:
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception as error:
        logger.info("Could not read the license from %s (%s).", readme, error)
        return None


def settings_rows(trainer) -> list[tuple[str, object]]:
    """(name, value) of the settings the card lists: the method's, then the training run's."""
    args, method = trainer.args, trainer.method
    rows: list[tuple[str, object]] = [("beta", args.beta), *method.settings(args).items()]
    rows += [(name, getattr(args, name)) for name in method.config_only_fields if getattr(args, name) is not None]
    rows += [("loss_type", args.loss_type)]
    if args.loss_weights is not None:
        rows.append(("loss_weights", args.loss_weights))
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum after __post_init__
    rows += [("learning_rate", args.learning_rate), ("lr_scheduler_type", scheduler)]
    rows += [("per_device_train_batch_size", args.per_device_train_batch_size)]
    rows += [("gradient_accumulation_steps", args.gradient_accumulation_steps)]
    rows += [("num_processes", args.world_size), ("max_length", args.max_length), ("seed", args.seed)]
    rows += [("optimizer steps", trainer.state.global_step)]
    return rows


def u_fraction_summary(log_history: list[dict]) -> str:
    """The first and last `u_fraction` a run logged (share of the batch's pairs in U: delta_ref < delta_pi < 0)."""
    logged = [entry for entry in log_history if "u_fraction" in entry]
    if not logged:
        return "No `u_fraction` was logged (the card was written before the first logging step)."
    first, last = logged[0], logged[-1]
    return (
        "`u_fraction`, the share of a batch's pairs in the undesirable space U (`delta_ref < delta_pi < 0`: the "
        "policy beats the reference's log-odds yet still prefers the rejected response), was "
        f"**{first['u_fraction']:.4g}** at the first logged step ({first.get('step')}) and "
        f"**{last['u_fraction']:.4g}** at the last ({last.get('step')})."
    )


def training_procedure(trainer, *, base_model: str, datasets: list[str]) -> str:
    """The method's part of the card's "Training procedure": method, settings, reference report, u_fraction and the
    diagnostics."""
    method = trainer.method
    description = getattr(trainer, "_card_description", None) or (
        f"Trained with trl-cpo's {method.title} trainer, from [{PAPER_TITLE}](https://arxiv.org/abs/{PAPER_ID}) "
        f"(arXiv:{PAPER_ID})."
    )
    rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in settings_rows(trainer))
    report = trainer.reference_report
    report_section = (
        ""
        if report is None
        else f"\n### Reference report (train set, before the first step)\n\n```text\n{report.format_table()}\n```\n"
    )
    return f"""### Method: {trainer._name}

{description}

> {NAMING_NOTE}

`{method.formula}`

- Base model: {base_model}
- Dataset: {", ".join(datasets) if datasets else "not recorded"}

| hyperparameter | value |
| --- | --- |
{rows}
{report_section}
### U-fraction during training

{u_fraction_summary(trainer.state.log_history)}

### Diagnostics at the end of training

{_diagnostics(trainer)}
"""


def _diagnostics(trainer) -> str:
    from .diagnostics import card_section  # imported here: this module loads without torch

    callback = getattr(trainer, "diagnostics", None)
    return card_section(trainer.state.log_history, getattr(callback, "final", {}))


def _versions() -> str:
    """The lines "Framework versions" gets next to TRL's: trl-cpo's, and PEFT's when installed."""
    from importlib.metadata import PackageNotFoundError, version

    lines = [f"- trl-cpo: {version('trl-cpo')}"]
    try:
        lines.append(f"- PEFT: {version('peft')}")
    except PackageNotFoundError:
        pass
    return "\n".join(lines) + "\n"


def _insert(text: str, anchor: str, addition: str, *, before: bool, what: str) -> str:
    """`addition` next to the first `anchor` in TRL's card text; at the end, with a warning, when TRL's card changed."""
    at = text.find(anchor)
    if at < 0:
        logger.warning("TRL's model card has no %r (its template changed): %s appended at the end.", anchor, what)
        return f"{text.rstrip()}\n\n{addition}"
    at = at if before else at + len(anchor)
    return text[:at] + addition + text[at:]


def extend_model_card(
    trainer,
    text: str,
    *,
    model_name: str,
    dataset_name: str | list[str] | None = None,
    base_model_id: str | None = None,
    license: str | None = None,
):
    """TRL's card (`text`, as `DPOTrainer.create_model_card` wrote it) with trl-cpo's method section, versions and
    citation added and its metadata made Hub-ready (see the module docstring); a `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard

    name_or_path = _trl_compat.get_config_model_id(trainer.model.config)
    base_hub_id, base_model = resolve_base_model(name_or_path, base_model_id)
    dataset_ids, datasets = resolve_datasets(dataset_name)
    is_adapter = hasattr(trainer.model, "peft_config")

    card = ModelCard(text)
    card.data.pop(_trl_compat.TRL_CARD_BOGUS_LICENSE_KEY, None)
    card.data.base_model = base_hub_id
    card.data.datasets = dataset_ids or None
    card.data.license = license or base_model_license(name_or_path, base_hub_id)
    card.data.library_name = "peft" if is_adapter else "transformers"

    body = card.text
    on_data = f" on {' and '.join(datasets)}" if datasets else ""
    opening = (
        f"This model{' (a PEFT adapter)' if is_adapter else ''} is a fine-tuned version of {base_model}{on_data}.\n"
        "It has been trained with trl-cpo, on [TRL](https://github.com/huggingface/trl).\n"
    )
    body, found = _trl_compat.TRL_CARD_OPENING.subn(lambda _: opening, body, count=1)
    if not found:
        body = _insert(body, _trl_compat.TRL_CARD_FRAMEWORK_VERSIONS, opening + "\n", before=True, what="the origin")
    hub_model_id = trainer.hub_model_id or model_name
    body = body.replace(_trl_compat.TRL_CARD_QUICK_START_MODEL.format("None"), f'model="{hub_model_id}"')
    method = training_procedure(trainer, base_model=base_model, datasets=datasets)
    body = _insert(body, _trl_compat.TRL_CARD_FRAMEWORK_VERSIONS, method + "\n", before=True, what="the method")
    body = _insert(body, _trl_compat.TRL_CARD_FRAMEWORK_VERSIONS, _versions(), before=False, what="the versions")
    if trainer._paper.get("id") != PAPER_ID:  # the DPO baseline and HyPO cite their paper, and the comparison's
        cite = f"Cite CPO / E-CPOC as:\n\n```bibtex\n{CITATION}\n```\n\n"
        body = _insert(body, _trl_compat.TRL_CARD_TRL_CITATION, cite, before=True, what="the CPO citation")
    card.text = body
    return card


def write_model_card(trainer, *, model_name: str, **card_kwargs) -> str:
    """Extend the card TRL just wrote to `output_dir/README.md` (`extend_model_card`) in place; its path."""
    path = os.path.join(trainer.args.output_dir, "README.md")
    with open(path, encoding="utf-8") as file:
        text = file.read()
    extend_model_card(trainer, text, model_name=model_name, **card_kwargs).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Hub dry run
# ----------------------------------------------------------------------------------------------------------------------


def hub_upload_files(folder: str | os.PathLike) -> list[str]:
    """The files (relative posix paths) `Trainer.push_to_hub` would upload from `folder`, as `upload_folder` picks
    them: every file, minus the Trainer's ignore patterns and huggingface_hub's defaults."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    ignore = [*TRAINER_PUSH_IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS]
    return list(filter_repo_objects(files, ignore_patterns=ignore))


def write_hub_dry_run(trainer, **card_kwargs) -> Path | None:
    """Write into `output_dir/_hub_dry_run/` exactly the files `trainer.push_to_hub(**card_kwargs)` would upload, and
    upload nothing.

    Build the trainer with `push_to_hub=False` (transformers' Trainer creates the Hub repo in `__init__` when it is
    True) and call this after training. It runs the steps of `Trainer.push_to_hub` (transformers 5.23,
    trainer.py:4368-4421) without its two network calls, `create_repo` and `upload_folder`: `args.push_to_hub` is
    set back to True (so `training_args.bin` is the one a push saves), the model is saved on every process, the card
    is written, and the files `upload_folder` would pick are copied. `trainer.hub_model_id` is `hub_model_id` as
    given (a push resolves a name without a namespace to your user's). Checkpoint pushes a real run makes during
    training (`hub_strategy`) are not reproduced: this is the final upload. Returns the folder on the main process.
    """
    args = trainer.args
    args.push_to_hub = True
    trainer.hub_model_id = args.hub_model_id or Path(args.output_dir).absolute().name
    if "/" not in trainer.hub_model_id:
        logger.warning(
            "hub_model_id=%r has no namespace: a real push uploads to <your user>/%s, which the card's quick start "
            "would name.",
            trainer.hub_model_id,
            trainer.hub_model_id,
        )
    # As Trainer.push_to_hub: save on every process (sharded models gather), then the main process writes the card.
    # `_internal_call=True` keeps save_model from pushing (it pushes when args.push_to_hub is set).
    _trl_compat.save_model_without_push(trainer)
    if not trainer.is_world_process_zero():
        return None
    model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
    card_kwargs = dict(card_kwargs)
    model_tags = getattr(trainer.model, "model_tags", None)
    if model_tags is not None:  # Trainer.push_to_hub passes the model's tags to the card
        tags = card_kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        card_kwargs["tags"] = tags + [tag for tag in model_tags if tag not in tags]
    trainer.create_model_card(model_name=card_kwargs.pop("model_name", model_name), **card_kwargs)
    folder = Path(args.output_dir) / HUB_DRY_RUN_DIR
    if folder.exists():
        shutil.rmtree(folder)
    for relative in hub_upload_files(args.output_dir):
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(args.output_dir) / relative, target)
    return folder
