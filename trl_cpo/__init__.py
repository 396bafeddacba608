"""trl-cpo: Constrained Preference Optimization (CPO, E-CPOC; arXiv:2605.20834) for Hugging Face TRL, and HyPO
(arXiv:2602.11902), the released CPO code's default variant.

Not TRL's Contrastive Preference Optimization (`trl.experimental.cpo`): same acronym, different algorithm.

The names below are imported on first use (PEP 562), as TRL's own `trl/__init__.py` does: `import trl_cpo` and the
`trl-cpo` command line load neither torch nor transformers until a trainer, config or function is used.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING

from . import _bnb_log

try:  # the installed distribution's version (pyproject.toml): one place
    __version__ = importlib.metadata.version("trl-cpo")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

# Before anything imports bitsandbytes (through transformers -> peft): drop its notice about a CPU inference kernel
# that trl-cpo never uses (see `trl_cpo._bnb_log`).
_bnb_log.install()

#: Public name -> the submodule that defines it.
_LAZY_NAMES = {
    "DiagnosticsCallback": "callbacks",
    "UFractionCallback": "callbacks",
    "end_training": "_distributed",
    "CPOConfig": "cpo_config",
    "CPOTrainer": "cpo_trainer",
    "ECPOCConfig": "ecpoc_config",
    "ECPOCTrainer": "ecpoc_trainer",
    "HyPOConfig": "methods",
    "HyPOTrainer": "trainers",
    "METHODS": "methods",
    "Method": "methods",
    "TRAINERS": "trainers",
    "ReferenceFileError": "reference_store",
    "ReferenceLogps": "reference",
    "compute_reference_logps": "reference",
    "load_reference_checkpoint": "reference_store",
    "save_reference_checkpoint": "reference_store",
    "GammaRecommendation": "report",
    "ReferenceReport": "report",
    "recommend_cpo_gamma": "report",
    "reference_report": "report",
    "wilson_interval": "report",
    "ReferenceReportCallback": "report_callback",
}

__all__ = [
    "METHODS",
    "TRAINERS",
    "CPOConfig",
    "CPOTrainer",
    "DiagnosticsCallback",
    "ECPOCConfig",
    "ECPOCTrainer",
    "GammaRecommendation",
    "HyPOConfig",
    "HyPOTrainer",
    "Method",
    "ReferenceFileError",
    "ReferenceLogps",
    "ReferenceReport",
    "ReferenceReportCallback",
    "UFractionCallback",
    "compute_reference_logps",
    "end_training",
    "load_reference_checkpoint",
    "recommend_cpo_gamma",
    "reference_report",
    "save_reference_checkpoint",
    "wilson_interval",
]


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_LAZY_NAMES})


if TYPE_CHECKING:  # static analysers and IDEs see the names eagerly
    from ._distributed import end_training
    from .callbacks import DiagnosticsCallback, UFractionCallback
    from .cpo_config import CPOConfig
    from .cpo_trainer import CPOTrainer
    from .ecpoc_config import ECPOCConfig
    from .ecpoc_trainer import ECPOCTrainer
    from .methods import METHODS, HyPOConfig, Method
    from .reference import ReferenceLogps, compute_reference_logps
    from .reference_store import ReferenceFileError, load_reference_checkpoint, save_reference_checkpoint
    from .report import GammaRecommendation, ReferenceReport, recommend_cpo_gamma, reference_report, wilson_interval
    from .report_callback import ReferenceReportCallback
    from .trainers import TRAINERS, HyPOTrainer
