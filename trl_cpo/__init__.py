"""trl-cpo: Constrained Preference Optimization (CPO, E-CPOC; arXiv:2605.20834) for Hugging Face TRL.

Not TRL's Contrastive Preference Optimization (`trl.experimental.cpo`): same acronym, different algorithm.
"""

from .callbacks import UFractionCallback
from .cpo_config import CPOConfig
from .cpo_trainer import CPOTrainer
from .ecpoc_config import ECPOCConfig
from .ecpoc_trainer import ECPOCTrainer
from .methods import METHODS, Method
from .reference import (
    ReferenceFileError,
    ReferenceLogps,
    compute_reference_logps,
    load_reference_checkpoint,
    save_reference_checkpoint,
)
from .report import GammaRecommendation, ReferenceReport, recommend_cpo_gamma, reference_report, wilson_interval
from .report_callback import ReferenceReportCallback

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CPOConfig",
    "CPOTrainer",
    "ECPOCConfig",
    "ECPOCTrainer",
    "GammaRecommendation",
    "Method",
    "ReferenceFileError",
    "ReferenceLogps",
    "ReferenceReport",
    "ReferenceReportCallback",
    "UFractionCallback",
    "compute_reference_logps",
    "load_reference_checkpoint",
    "recommend_cpo_gamma",
    "reference_report",
    "save_reference_checkpoint",
    "wilson_interval",
]
