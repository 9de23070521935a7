"""The SmartFRZ attention predictor: model, weight files (training pipeline: issue 3)."""

from .model import (
    DEFAULT_WEIGHTS,
    AttentionPredictor,
    PredictorConfig,
    PredictorWeightsError,
    load_predictor,
    save_predictor,
)

__all__ = [
    "AttentionPredictor",
    "PredictorConfig",
    "PredictorWeightsError",
    "DEFAULT_WEIGHTS",
    "load_predictor",
    "save_predictor",
]
