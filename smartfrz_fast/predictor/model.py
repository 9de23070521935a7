"""The SmartFRZ attention predictor as an ``nn.Module`` (for training), and its weight files.

The forward pass is ``ops.reference.predictor_logits_ref``: the module only owns the weights,
so training, the reference op and the fused kernels all compute the same function.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from ..ops.reference import PREDICTOR_MLPS, normalize_window, predictor_logits_ref

WEIGHTS_FORMAT = "smartfrz_fast.predictor"
WEIGHTS_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "smartfrz_predictor.pt"


class PredictorWeightsError(RuntimeError):
    """The predictor's weights are missing, unreadable or do not match the configuration."""


@dataclass(frozen=True)
class PredictorConfig:
    sample_size: int = 1024  # K: sampled weights per snapshot
    window: int = 30  # T: snapshots per decision (1 query + T-1 keys/values)
    hidden: int = 256  # Q/K/V MLPs: K -> hidden -> hidden -> embed
    embed: int = 64
    head_hidden: int = 32  # head: embed -> head_hidden -> head_hidden -> 2


def _mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AttentionPredictor(nn.Module):
    def __init__(self, config: PredictorConfig = PredictorConfig()):
        super().__init__()
        self.config = config
        qkv = [config.sample_size, config.hidden, config.hidden, config.embed]
        self.query = _mlp(qkv)
        self.key = _mlp(qkv)
        self.value = _mlp(qkv)
        self.head = _mlp([config.embed, config.head_hidden, config.head_hidden, 2])

    def flat_weights(self) -> List[Tensor]:
        """Weights in the order the ``smartfrz::predict`` op takes them."""
        out: List[Tensor] = []
        for name in PREDICTOR_MLPS:
            for layer in getattr(self, name):
                if isinstance(layer, nn.Linear):
                    out += [layer.weight, layer.bias]
        return out

    def forward(self, window: Tensor, valid: Tensor) -> Tensor:
        """Raw windows ``[N, T, K]`` (oldest first) and valid counts ``[N]`` -> logits ``[N, 2]``."""
        return predictor_logits_ref(normalize_window(window, valid), self.flat_weights())


def save_predictor(model: AttentionPredictor, path: Union[str, Path], provenance: Dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "config": asdict(model.config),
        "state_dict": state,
        "digest": _digest(state),
        "provenance": provenance,
    }, path)


def _digest(state: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def load_predictor(path: Optional[Union[str, Path]] = None, map_location: Any = "cpu") -> AttentionPredictor:
    """Load predictor weights, checking format, configuration and content digest."""
    path = Path(path) if path is not None else Path(os.environ.get("SMARTFRZ_PREDICTOR", DEFAULT_WEIGHTS))
    if not path.exists():
        raise PredictorWeightsError(
            f"no SmartFRZ predictor weights at {path}. This build ships none yet (they are made "
            "by `python -m smartfrz_fast.lab.train`); pass weights=<file> to SmartFRZ, or "
            "use a baseline policy (FreezeOut, AutoFreeze, LinearFreeze, StaticFreeze). The "
            "SmartFRZ policy never runs with untrained weights."
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say so, whatever torch raised
        raise PredictorWeightsError(
            f"SmartFRZ predictor weights {path} are unreadable ({type(exc).__name__}: {exc}). "
            "The file is corrupt or not a predictor file: "
            + ("reinstall the package or retrain it." if path == DEFAULT_WEIGHTS else
               "pass a file written by save_predictor (python -m smartfrz_fast.lab.train), or "
               "weights=None for the shipped ones.")
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise PredictorWeightsError(f"{path} is not a SmartFRZ predictor file (no '{WEIGHTS_FORMAT}' tag)")
    if blob.get("version") != WEIGHTS_VERSION:
        raise PredictorWeightsError(f"{path} has predictor file version {blob.get('version')}, expected {WEIGHTS_VERSION}")
    try:
        config = PredictorConfig(**blob["config"])
        model = AttentionPredictor(config)
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:
        raise PredictorWeightsError(f"{path} does not match the predictor architecture: {exc}") from exc
    if _digest(blob["state_dict"]) != blob.get("digest"):
        raise PredictorWeightsError(f"{path} fails its content check (digest mismatch): the file is corrupt")
    nonfinite = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if nonfinite:  # a diverged training run: every score would be NaN and nothing would ever freeze
        raise PredictorWeightsError(f"{path} holds NaN or inf weights ({nonfinite[:3]}): the predictor's "
                                    "training diverged. Retrain it, or use the shipped weights (weights=None).")
    provenance = blob.get("provenance", {})
    if not isinstance(provenance, dict):
        raise PredictorWeightsError(f"{path} has a provenance of type {type(provenance).__name__}, not a dict: "
                                    "the file was not written by save_predictor")
    model.provenance = provenance
    return model.to(map_location).eval()
