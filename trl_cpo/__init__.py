"""trl-cpo: Constrained Preference Optimization (CPO, E-CPOC; arXiv:2605.20834) for Hugging Face TRL.

Not TRL's Contrastive Preference Optimization (`trl.experimental.cpo`): same acronym, different algorithm.
"""

from .callbacks import UFractionCallback
from .cpo_config import CPOConfig
from .cpo_trainer import CPOTrainer
from .ecpoc_config import ECPOCConfig
from .ecpoc_trainer import ECPOCTrainer
from .reference import ReferenceLogps, compute_reference_logps, load_reference_checkpoint, save_reference_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CPOConfig",
    "CPOTrainer",
    "ECPOCConfig",
    "ECPOCTrainer",
    "ReferenceLogps",
    "UFractionCallback",
    "compute_reference_logps",
    "load_reference_checkpoint",
    "save_reference_checkpoint",
]
