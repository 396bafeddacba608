"""`trl-cpo demo`'s arguments and every check made before anything trains.

- `DemoArguments`: every flag (and key of a ``--config`` YAML), parsed by `trl.TrlParser` in `run`, with its own checks;
  the method settings default to the method configs' own defaults;
- `build_configs`: the training config of every row (`rows.build_config`), built up front so that the configs' own
  checks reject a bad flag (``--ecpoc_tau 0``, ``--beta -1``) with one line;
- `prepare_output_dir`: refuse an output folder that holds files unless ``--overwrite_output_dir``, in which case the
  demo's own earlier outputs there are deleted first.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from trl_cpo.cpo_config import CPOConfig
from trl_cpo.ecpoc_config import ECPOCConfig
from trl_cpo.report import DEFAULT_LIFT_SHARE

from .rows import ROWS, build_config

SWEEP_HINT = "0 0.2 0.4 0.6"
#: Files the demo writes into --output_dir (deleted by --overwrite_output_dir; nothing else ever is). results.json is
#: written through results.json.partial.
OUTPUT_FILES = ("results.json", "results.json.partial", "table.txt", "sweep.png")
OUTPUT_PATTERN = ("curves_corruption-", ".png")


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class DemoArguments:
    """Arguments of `trl-cpo demo` (every field is a flag of the same name, and a key of a ``--config`` YAML)."""

    # -- run ----------------------------------------------------------------------------------------------------------
    corruption: list[float] = field(
        default_factory=lambda: [0.4],
        metadata=_help(
            "Share(s) of the topics (hence pairs) on which the reference imitates the rejected response. Several "
            f"values run a sweep, e.g. --corruption {SWEEP_HINT}."
        ),
    )
    seeds: int = field(
        default=3,
        metadata=_help(
            "Seeds per corruption ratio (--seed, --seed + 1, ...): each draws its own data, reference and training; "
            "every number is reported as the mean with a 95%% t-interval across seeds."
        ),
    )
    seed: int = field(default=0, metadata=_help("First seed."))
    methods: list[str] = field(
        default_factory=lambda: list(ROWS),
        metadata=_help("Rows to train from the reference.", choices=list(ROWS)),
    )
    max_steps: int = field(default=150, metadata=_help("Optimizer steps per row (same budget for all)."))
    per_device_train_batch_size: int = field(default=16, metadata=_help("Preference pairs per step."))
    learning_rate: float = field(default=5e-4, metadata=_help("AdamW learning rate, constant, same for all rows."))
    eval_every: int = field(default=25, metadata=_help("Measure on the held-out pairs every N steps."))
    output_dir: str = field(default="demo_output", metadata=_help("Where the table, plots and JSON are written."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Run even if --output_dir holds files: the demo's own earlier outputs there (results.json, table.txt, "
            "*.png) are deleted first; other files are left alone."
        ),
    )
    num_threads: int = field(
        default=1,
        metadata=_help("torch CPU threads. 1 is fastest for this tiny model and keeps runs reproducible."),
    )
    disable_tqdm: bool = field(default=False, metadata=_help("Hide the progress bars."))

    # -- method hyperparameters ---------------------------------------------------------------------------------------
    beta: float = field(
        default=CPOConfig.beta,
        metadata=_help("Inverse temperature of every row (released CPO setting on length-normalized log-probs)."),
    )
    cpo_gamma: float = field(
        default=CPOConfig.cpo_gamma,
        metadata=_help("cpo_gamma of the CPO and CPO-inverse_logp rows (released setting 0.05)."),
    )
    cpo_max_margin: float = field(
        default=CPOConfig.cpo_max_margin, metadata=_help("cpo_max_margin of every CPO row (logit units).")
    )
    cpo_auto_gamma: float = field(
        default=DEFAULT_LIFT_SHARE,
        metadata=_help(
            "Share of the misaligned train pairs the CPO-auto row's cpo_gamma must lift (CPOConfig.cpo_auto_gamma)."
        ),
    )
    ecpoc_gamma: float = field(default=ECPOCConfig.ecpoc_gamma, metadata=_help("E-CPOC floor of the target log-odds."))
    ecpoc_tau: float = field(default=ECPOCConfig.ecpoc_tau, metadata=_help("E-CPOC smooth-max sharpness."))
    ecpoc_alpha: float = field(
        default=ECPOCConfig.ecpoc_alpha, metadata=_help("E-CPOC scale 1/ecpoc_alpha of the correction term.")
    )

    # -- synthetic task and reference ---------------------------------------------------------------------------------
    num_topics: int = field(default=20, metadata=_help("Topics; corruption is applied per topic."))
    label_noise: float = field(
        default=0.2,
        metadata=_help("Share of training pairs whose chosen/rejected labels are swapped (annotator disagreement)."),
    )
    ref_noise: float = field(
        default=0.1,
        metadata=_help("Per-word chance that the reference's SFT target uses the other pool: how sure it is."),
    )
    train_pairs: int = field(
        default=2400,
        metadata=_help("Training pairs (also the reference's SFT prompts); 150 steps x 16 pairs sees each once."),
    )
    eval_pairs: int = field(default=500, metadata=_help("Held-out pairs (majority labels), balanced over topics."))
    ref_steps: int = field(default=300, metadata=_help("SFT steps of the reference."))
    ref_learning_rate: float = field(default=3e-3, metadata=_help("SFT learning rate of the reference."))
    ref_batch_size: int = field(default=32, metadata=_help("SFT batch size of the reference."))
    hidden_size: int = field(default=64, metadata=_help("Width of the tiny Llama (a multiple of 4: 4 heads)."))
    num_layers: int = field(default=2, metadata=_help("Layers of the tiny Llama."))

    def __post_init__(self):
        for name in (
            "seeds",
            "max_steps",
            "per_device_train_batch_size",
            "eval_every",
            "num_threads",
            "num_topics",
            "train_pairs",
            "eval_pairs",
            "ref_steps",
            "ref_batch_size",
            "hidden_size",
            "num_layers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} {value!r} is invalid: it must be an integer >= 1.")
        if self.hidden_size % 4:
            raise ValueError(f"--hidden_size {self.hidden_size} is invalid: use a multiple of 4 (4 attention heads).")
        self.corruption = [float(c) for c in self.corruption]
        bad = [c for c in self.corruption if not 0 <= c <= 1]
        if bad:
            raise ValueError(f"--corruption {bad} is invalid: each value is a share of the topics, in [0, 1].")
        if len(set(self.corruption)) != len(self.corruption):
            raise ValueError(f"--corruption {self.corruption} lists a value twice; give each ratio once.")
        unknown = [m for m in self.methods if m not in ROWS]
        if unknown:
            raise ValueError(f"--methods {unknown} is invalid: choose among {' '.join(ROWS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods {self.methods} lists a row twice; give each once.")
        for name in ("label_noise", "ref_noise"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"--{name} {getattr(self, name)!r} is invalid: it must be in [0, 0.5).")
        if not self.corruption or not self.methods:
            raise ValueError("--corruption and --methods need at least one value each.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= 2**32 - self.seeds:
            raise ValueError(f"--seed {self.seed} is invalid: seeds must be in [0, 2**32 - 1] (numpy's range).")
        for name in ("learning_rate", "ref_learning_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"--{name} {value!r} is invalid: it must be a finite number > 0.")
        self._check_method_settings()

    def _check_method_settings(self) -> None:
        """The method settings, checked as the configs check them, whichever rows run."""
        from trl_cpo.losses import check_beta, check_margin_hyperparameters, check_target_hyperparameters

        share = self.cpo_auto_gamma
        try:
            check_beta(self.beta)
            check_margin_hyperparameters(gamma=self.cpo_gamma, max_margin=self.cpo_max_margin, prefix="cpo_")
            check_target_hyperparameters(
                gamma=self.ecpoc_gamma, tau=self.ecpoc_tau, alpha=self.ecpoc_alpha, prefix="ecpoc_"
            )
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(
                    f"cpo_auto_gamma={share!r} is invalid: it is the share of misaligned pairs to lift, in (0, 1]."
                )
        except ValueError as error:
            raise ValueError(f"--{error}") from None

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


class UsageError(ValueError):
    """A user error found before anything trains: `main` prints it on one line and exits with status 2."""


def build_configs(args: DemoArguments, output_dir: str = "demo-configs") -> dict[str, Any]:
    """Every row's config, built before anything trains so that their checks reject a bad flag up front.

    Raises `UsageError` with the config's own message (it names the field, which is also the flag).
    """
    configs = {}
    for name in args.methods:
        try:
            configs[name] = build_config(name, args, seed=args.seed, output_dir=output_dir)
        except ValueError as error:
            raise UsageError(f"{error} (row {name})") from None
    return configs


def _own_outputs(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if _is_output(name))


def _is_output(name: str) -> bool:
    prefix, suffix = OUTPUT_PATTERN
    return name in OUTPUT_FILES or (name.startswith(prefix) and name.endswith(suffix))


def remove_outputs(path: str) -> list[str]:
    """Delete the demo's own files in `path` (what a failed run wrote); return their names."""
    removed = _own_outputs(path) if os.path.isdir(path) else []
    for name in removed:
        os.remove(os.path.join(path, name))
    return removed


def prepare_output_dir(path: str, overwrite: bool, inputs: dict[str, str | None] | None = None) -> list[str]:
    """Check `path` before anything trains; return the earlier demo outputs it deleted.

    An input (`inputs`: flag -> file, e.g. the --config YAML) named as one of the demo's outputs in `path` is refused,
    even with `overwrite`: the demo never writes over its inputs. A folder that holds files is refused unless
    `overwrite`; then the demo's own files there (results.json, table.txt, the PNGs) are deleted, so no stale figure
    survives next to new results. Nothing else is touched.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output_dir {path!r} is a file, not a folder; choose another --output_dir.")
    for flag, source in (inputs or {}).items():
        folder = os.path.realpath(os.path.dirname(os.path.abspath(source))) if source else None
        if folder == os.path.realpath(path) and _is_output(os.path.basename(source)):
            raise UsageError(
                f"{flag} {source} has the name of a file the demo writes in --output_dir {path!r}; the demo never "
                "writes over its inputs, even with --overwrite_output_dir. Move or rename it, or choose another "
                "--output_dir."
            )
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            found = _own_outputs(path) or sorted(os.listdir(path))
            raise UsageError(
                f"--output_dir {path!r} already holds files ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}"
                "); pass --overwrite_output_dir to replace the demo's outputs there, or choose an empty --output_dir."
            )
        removed = _own_outputs(path)
        for name in removed:
            os.remove(os.path.join(path, name))
    else:
        removed = []
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"--output_dir {path!r} cannot be written ({error.strerror}); choose another one.") from None
    return removed
