"""The SmartFRZ attention predictor at run time: model, weight files, loading. Light to import;
the offline lab that makes the weights lives in ``smartfrz_fast.lab``."""

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
