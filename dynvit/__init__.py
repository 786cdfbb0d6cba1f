"""dynvit: learned token pruning for timm Vision Transformers.

Train predictors that decide which patch tokens to keep (binary Gumbel-sigmoid with a
straight-through estimator), then really drop tokens at inference and count what it saved.
"""
from .calibrate import calibrate
from .compiled import compile
from .export import export_model
from .fit import fit_signals
from .flops import count_flops
from .hub import load_pretrained, push_to_hub, save_pretrained
from .gumbel import gumbel_sigmoid, logistic_noise, straight_through_sigmoid
from .model import DynViTMixin, PruningOutput, TrainingModel
from .patch import build_model, is_patched, patch
from .predictor import TokenPredictor
from .ratios import normalize_keep_ratio, normalize_prune_loc
from .schedule import NoiseSchedule, TauSchedule, tau_at
from .weights import WeightMismatchError, load_weights

__version__ = "0.1.0"

__all__ = [
    "build_model",
    "calibrate",
    "compile",
    "fit_signals",
    "patch",
    "is_patched",
    "gumbel_sigmoid",
    "straight_through_sigmoid",
    "logistic_noise",
    "tau_at",
    "TauSchedule",
    "NoiseSchedule",
    "count_flops",
    "export_model",
    "save_pretrained",
    "load_pretrained",
    "push_to_hub",
    "load_weights",
    "WeightMismatchError",
    "PruningOutput",
    "TrainingModel",
    "DynViTMixin",
    "TokenPredictor",
    "normalize_keep_ratio",
    "normalize_prune_loc",
]
