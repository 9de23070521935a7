"""The SmartFRZ attention predictor as an ``nn.Module`` (for training), and its weight files.

The forward pass is ``ops.reference.predictor_logits_ref``: the module only owns the weights,
so training, the reference op and the fused kernels all compute the same function.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..history import UNRECORDED_SAMPLING
from ..ops.reference import PREDICTOR_MLPS, normalize_window, predictor_logits_ref

WEIGHTS_FORMAT = "smartfrz_fast.predictor"
# 2: the digest covers the configuration and the provenance too (whose input_gain and
# sort_by_newest change every prediction). 1: the weights only; refused, see upgrade_predictor_file.
WEIGHTS_VERSION = 2
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
    """Write ``model`` and its ``provenance`` (a JSON-like dict: how it was made, and the input
    transform it was trained with, ``input_gain`` and ``sort_by_newest``) with a digest of both."""
    _check_provenance(provenance, "save_predictor")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "config": asdict(model.config),
            "state_dict": state, "provenance": provenance}
    blob["digest"] = _digest(blob)
    # a torn file would be refused at every later load: a resumed rebuild stopped on it
    write_atomically(path, lambda tmp: torch.save(blob, tmp))


def write_atomically(path: Union[str, Path], write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` a file beside ``path``, then move it there: a job killed while writing
    leaves the old file or none, never a torn one. The temporary name is this process's own
    (shards of a rebuild may write the same file at once)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch.save's own error names no file (a full disk)
        raise OSError(f"could not write {path} ({type(exc).__name__}: {exc}): is its disk full or read-only? "
                      "The file there before, if any, is unchanged") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _digest(blob: Dict[str, Any]) -> str:
    """sha256 of everything in a predictor file but the digest: format, version, configuration and
    provenance (canonical JSON), and each weight's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    header = {k: blob.get(k) for k in ("format", "version", "config", "provenance")}
    h.update(json.dumps(header, sort_keys=True, allow_nan=True).encode())
    state = blob["state_dict"]
    for name in sorted(state):
        tensor = state[name]
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# the provenance fields that change what the predictor answers (the rest: how it was made, when, how long)
PREDICTION_FIELDS = {"input_gain": 1.0, "sort_by_newest": False, "history_sampling": None}


def prediction_digest(blob: Dict[str, Any]) -> str:
    """sha256 of what a predictor file's answers depend on: configuration, weights and the
    provenance fields in PREDICTION_FIELDS. Two trainings that end in the same weights share it
    (their wall times differ), so the lab keeps evaluation rows made with either."""
    provenance = blob.get("provenance") or {}
    fields = {k: provenance.get(k, default) for k, default in PREDICTION_FIELDS.items()}
    return _digest({"format": blob.get("format"), "version": blob.get("version"), "config": blob.get("config"),
                    "provenance": fields, "state_dict": blob["state_dict"]})


def _weights_digest_v1(state: Dict[str, Tensor]) -> str:
    """Version 1's digest: the weights' names and bytes only."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_provenance(provenance: Any, where: str) -> None:
    """A dict that JSON can write (so that the digest covers it), whose fields that change
    predictions hold values the predict op takes."""
    if not isinstance(provenance, dict):
        raise PredictorWeightsError(f"{where} has a provenance of type {type(provenance).__name__}, not a dict: "
                                    "the file was not written by save_predictor")
    try:
        json.dumps(provenance, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise PredictorWeightsError(f"{where} has a provenance that is not JSON-like data (str keys; numbers, strings, lists, dicts): "
                                    f"{exc}") from exc
    gain = provenance.get("input_gain", 1.0)
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not (math.isfinite(gain) and gain > 0):
        raise PredictorWeightsError(f"{where} has a provenance input_gain={gain!r}: it must be a finite number > 0 (the "
                                    "deviation gain the predictor was trained with)")
    if not isinstance(provenance.get("history_sampling", ""), str):
        raise PredictorWeightsError(f"{where} has a provenance history_sampling={provenance['history_sampling']!r}, "
                                    "not a string (the weight sampling the predictor was trained on)")
    if not isinstance(provenance.get("sort_by_newest", False), bool):
        raise PredictorWeightsError(f"{where} has a provenance sort_by_newest={provenance['sort_by_newest']!r}, not True or False")


def load_predictor(path: Optional[Union[str, Path]] = None, map_location: Any = "cpu") -> AttentionPredictor:
    """Load predictor weights, checking format, configuration and content digest. ``path``
    None: ``$SMARTFRZ_PREDICTOR`` if set, else the shipped weights."""
    path, origin, fix = _weights_path(path)
    if not path.is_file():
        raise PredictorWeightsError(
            f"no SmartFRZ predictor weights at {path} ({origin}): "
            + ("it is a folder, not a predictor file. " if path.is_dir() else "")
            + f"{fix} The SmartFRZ policy never runs with untrained weights; the baseline policies "
            "(FreezeOut, AutoFreeze, LinearFreeze, StaticFreeze) need none.")
    blob = _read_weights_file(path, f"SmartFRZ predictor weights {path} ({origin})", fix)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise PredictorWeightsError(f"{path} is not a SmartFRZ predictor file (no '{WEIGHTS_FORMAT}' tag)")
    if blob.get("version") == 1:
        raise PredictorWeightsError(
            f"{path} is a version-1 predictor file, whose digest covers the weights but not the provenance, "
            "and the provenance's input_gain and sort_by_newest change every prediction. Retrain it, or, if you "
            "trust the file, re-save it as version 2: smartfrz_fast.predictor.model.upgrade_predictor_file(old, new)")
    if blob.get("version") != WEIGHTS_VERSION:
        raise PredictorWeightsError(f"{path} has predictor file version {blob.get('version')}, expected {WEIGHTS_VERSION}")
    model = _model_of(blob, path)
    try:
        digest = _digest(blob)
    except (TypeError, ValueError):  # a provenance JSON cannot write: checked below with the reason
        digest = None
    if digest is None or digest != blob.get("digest"):
        _check_provenance(blob.get("provenance"), str(path))
        raise PredictorWeightsError(f"{path} fails its content check (digest mismatch): the file is corrupt or "
                                    "was edited (the digest covers the weights, configuration and provenance)")
    nonfinite = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if nonfinite:  # a diverged training run: every score would be NaN and nothing would ever freeze
        raise PredictorWeightsError(f"{path} holds NaN or inf weights ({nonfinite[:3]}): the predictor's "
                                    "training diverged. Retrain it, or use the shipped weights (weights=None).")
    _check_provenance(blob.get("provenance"), str(path))
    model.provenance = blob["provenance"]
    model.digest = blob["digest"]  # names this file (a resumed SmartFRZ checks it is the saved one's)
    model.prediction_digest = prediction_digest(blob)  # names its answers (the lab tells stale rows by it)
    # the weight histories it was trained on (history.SAMPLING); a file that does not say predates the field
    model.history_sampling = model.provenance.get("history_sampling", UNRECORDED_SAMPLING)
    return model.to(map_location).eval()


def _weights_path(path: Optional[Union[str, Path]]) -> Tuple[Path, str, str]:
    """(the file, where its name came from, what to do if it is bad)."""
    if path is not None:
        return Path(path), "given as weights=", ("Pass a file written by save_predictor (python -m smartfrz_fast.lab.train), "
                                        "or weights=None for the shipped ones.")
    env = os.environ.get("SMARTFRZ_PREDICTOR")
    if env is not None:
        if not env.strip():
            raise PredictorWeightsError("SMARTFRZ_PREDICTOR is set but empty: unset it to use the shipped SmartFRZ "
                                        "weights, or set it to a predictor file.")
        return Path(env), "from $SMARTFRZ_PREDICTOR", ("Point SMARTFRZ_PREDICTOR at a file written by save_predictor, "
                                                        "or unset it for the shipped weights.")
    return DEFAULT_WEIGHTS, "the shipped weights", "Reinstall the package (or retrain the weights: docs/predictor.md)."


def _read_weights_file(path: Path, what: str, fix: str) -> Any:
    """``torch.load`` of tensors and builtins only; anything else is an error that says so."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say so, whatever torch raised
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            # torch's text suggests loading it unsafely: not that
            detail = "it holds Python objects besides tensors, which are not loaded"
        elif isinstance(exc, (pickle.UnpicklingError, KeyError)):  # not a pickle at all (random bytes, text)
            detail = "it is not a file torch.save wrote"
        elif isinstance(exc, EOFError):
            detail = "it is empty or cut short"
        else:
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise PredictorWeightsError(f"{what} are unreadable ({detail}). The file is corrupt or not a predictor "
                                    f"file. {fix}") from exc


def _model_of(blob: Dict[str, Any], path: Path) -> AttentionPredictor:
    config = blob.get("config")
    bad = {k: v for k, v in config.items() if isinstance(v, bool) or not isinstance(v, int)
           or v < (2 if k == "window" else 1)} if isinstance(config, dict) else config
    if bad:
        raise PredictorWeightsError(f"{path} has a configuration with {bad!r}: the sizes are whole numbers "
                                    "(window >= 2, the rest >= 1). The file is corrupt or was edited.")
    try:
        # nn.Linear's initialisation draws from torch's generator, and the file's weights replace it:
        # building the predictor must not move the user's random stream (data order, dropout)
        with torch.random.fork_rng(devices=[]):
            model = AttentionPredictor(PredictorConfig(**blob["config"]))
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, RuntimeError, AttributeError) as exc:
        raise PredictorWeightsError(f"{path} does not match the predictor architecture: {exc}") from exc
    return model


def upgrade_predictor_file(path: Union[str, Path], out: Union[str, Path]) -> None:
    """Re-save a version-1 predictor file as version 2, whose digest covers the configuration and
    provenance as well as the weights. The version-1 digest vouches for the weights only: upgrade
    only a file whose provenance (``input_gain``, ``sort_by_newest``) you trust."""
    path = Path(path)
    blob = _read_weights_file(path, f"{path}", "Pass a version-1 predictor file.")
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT or blob.get("version") != 1:
        raise PredictorWeightsError(f"{path} is not a version-1 SmartFRZ predictor file")
    _model_of(blob, path)
    if _weights_digest_v1(blob["state_dict"]) != blob.get("digest"):
        raise PredictorWeightsError(f"{path} fails its version-1 content check (digest mismatch): the file is corrupt")
    _check_provenance(blob.get("provenance", {}), str(path))
    upgraded = {**blob, "version": WEIGHTS_VERSION, "provenance": blob.get("provenance", {})}
    upgraded["digest"] = _digest(upgraded)
    torch.save(upgraded, out)
