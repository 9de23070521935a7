"""Egeria (Wang et al., EuroSys 2023, "Egeria: Efficient DNN Training with Knowledge-Guided
Layer Freezing"): freeze a unit once its activations stop moving relative to a reference model."""

from __future__ import annotations

import copy
import math
import numbers
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..units import copy_model, example_call, preserved_rngs
from .base import Decision, FreezePolicy, PolicyContext, UnitInfo, plain_number


# The plasticity of a unit that keeps moving reads ~2 right after each reference refresh (its
# first distance is the int8 rounding floor alone) and falls as the window ages (to ~0.2-0.6
# by the refresh), whether or not the unit converges; on ordinary runs (cosine lr, a few
# hundred steps) it seldom stays under 0.1 for two evaluations, so the old default froze
# nothing on the demo (375 steps). 0.3 acts there (docs/egeria_spfde.md, measured).
DEFAULT_TOLERANCE = 0.3


def _generator_states(device: torch.device) -> List[Any]:
    """The global generators a forward may draw from, as comparable values: torch's on the CPU
    and, where the copies run on a GPU, on that GPU; Python's and numpy's."""
    import random
    import sys

    states: List[Any] = [torch.get_rng_state().tolist(), random.getstate()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device).tolist())
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, key, pos, *rest = numpy.random.get_state()
        states.append((kind, key.tolist(), pos, *rest))
    return states


def fake_quantize_int8(weight: Tensor) -> Tensor:
    """Per-output-channel (dim 0) symmetric int8 fake quantisation: ``round(w / s) * s`` with
    ``s = max|w| / 127`` per channel, codes clamped to [-127, 127]. Tensors of fewer than two
    dimensions (biases, norm scales) are returned unchanged, as int8 inference backends keep them."""
    if weight.dim() < 2:
        return weight.clone()
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))  # half types in fp32
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
    scale = (amax / 127.0).reshape(-1, *([1] * (w.dim() - 1)))
    return (torch.round(w / scale).clamp_(-127, 127) * scale).to(weight.dtype)


def relative_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0..n-1, times (n-1), over their mean magnitude:
    the fraction by which the fitted line changes across the window."""
    y = torch.tensor(list(values), dtype=torch.float64)
    n = y.numel()
    if n < 2:
        return float("inf")
    x = torch.arange(n, dtype=torch.float64)
    x = x - x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    return abs(slope) * (n - 1) / (float(y.abs().mean()) + 1e-12)


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(out, dict):
        for item in out.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _stamp(t: Tensor) -> Optional[Tuple[int, int]]:
    """(identity, version counter) of a frozen parameter: equal stamps mean nobody wrote it
    (``copy_``, ``load_state_dict`` bump the counter). None: unknown (an inference tensor keeps
    no counter). Only for frozen parameters: kernels that update tensors themselves (batch
    norm's running statistics) do not bump it."""
    try:
        return id(t), t._version
    except RuntimeError:
        return None


def _measured_modules(units: Sequence[UnitInfo]) -> List[str]:
    """Per unit, the module whose output measures it: its last module (a module's name may hold
    "+", which joins the names in unit.name), unless that module holds a later unit's modules. A
    container's own parameter (torchvision ViT's class token on the model, a learned input
    scale) is such a unit: measured at the container's output, it read the model's logits,
    which move with the head, and held every unit after it unfrozen. It takes the next unit's
    measure, the first activation after its parameter is read."""
    lasts = []
    for unit in units:
        last = unit.module_names[-1] if unit.module_names else unit.name.split("+")[-1]
        lasts.append("" if last == "<root>" else last)
    measured = list(lasts)
    above_later: set = set()  # every module above a later unit's modules
    for index in reversed(range(len(units))):
        if lasts[index] in above_later:
            measured[index] = measured[index + 1]
        for name in units[index].module_names:
            parts = name.split(".") if name else []
            above_later.update(".".join(parts[:depth]) for depth in range(len(parts)))
    return measured


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _check_state(state: Dict[str, Any], units: int, references: Sequence[Tensor]) -> None:
    """A saved Egeria state that a later step could not use (a damaged or hand-edited
    checkpoint) is refused here, naming the entry, rather than failing steps later or feeding NaN
    into the decisions. A reference holds the model's buffers as they are: inf in one is no damage."""
    def bad(entry: str) -> ValueError:
        return ValueError(f"Egeria: the checkpoint's {entry!r} is not what Egeria saves (a damaged or edited "
                          "checkpoint?): resume from another checkpoint, or start Egeria afresh")

    windows, pending = state["windows"], state["pending"]
    if not isinstance(windows, (list, tuple)) or len(windows) != units or not all(
            isinstance(w, (list, tuple)) and all(_is_number(d) for d in w) for w in windows):
        raise bad("windows")
    if not isinstance(state["hits"], (list, tuple)) or not all(
            isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 0 for h in state["hits"]):
        raise bad("hits")
    if not isinstance(state["evaluations"], numbers.Integral) or state["evaluations"] < 0:
        raise bad("evaluations")
    if pending is not None and (not isinstance(pending, (list, tuple)) or len(pending) != units
                                or not all(isinstance(d, numbers.Real) and not isinstance(d, bool) for d in pending)):
        raise bad("pending")  # NaN in pending is "not measured" (a unit frozen when the evaluation began)
    if not all(isinstance(t, Tensor) and t.shape == r.shape and not torch.isnan(t.float()).any()
               for t, r in zip(state["reference"], references)):  # inf is a buffer's (a causal mask's, an observer's)
        raise bad("reference")


class Egeria(FreezePolicy):
    """Egeria / KGT: knowledge-guided front-to-back freezing.

    Every ``interval`` optimizer steps (after ``warmup`` steps), the current weights are
    copied into a shadow model, and a worker thread runs the shadow and the *reference model*
    on a fixed probe batch, recording each active unit's output. The reference is an int8
    snapshot of the training model (per-channel symmetric fake quantisation of a copy's
    weights; biases and norm parameters stay fp32), refreshed every ``ref_refresh``
    evaluations. A unit's distance is ``mean((a - a_ref)^2) / mean(a^2)`` over the probe batch;
    its *plasticity* is the relative least-squares slope of its last ``window`` distances
    (measured since the last refresh). A unit whose plasticity stays below ``tolerance`` for
    ``patience`` evaluations in a row is converged; the leading run of converged active units
    freezes.

    Off the critical path: the training thread only copies the weights (into pinned host
    buffers, non-blocking, on a GPU) and submits the job; the result of the evaluation launched
    at step s is consumed at step s + interval (by then long finished, and the same every run).
    ``overhead()`` reports the worker's time and the training thread's copy and wait times.

    Deviations from the paper: the probe batch is fixed (the paper feeds the reference the
    training batches); activations of the training model are recomputed on the shadow copy
    (eval mode, so BatchNorm uses running statistics) rather than taken from the training
    forward; the paper's unfreezing after a learning-rate change is not done (the engine's
    freezing is monotone).

    Args:
        model: the model being trained (the module whose units the engine finds; under DDP,
            the inner module). Construct the policy before ``SmartFreezer``: it copies the model.
        probe_inputs: the inputs of one forward pass, kept fixed, as ``SmartFreezer``'s
            ``example_inputs``: a tensor or a tuple of positional inputs, or a dict of keyword
            inputs (a Hugging Face batch). Checked with one forward pass now.
        probe_kwargs: further keyword inputs of that pass.
        interval: optimizer steps between evaluations; default ``total_steps // 50``.
        window: evaluations in the slope fit (W).
        tolerance: plasticity threshold (T). Default 0.3: at 0.1 the rule froze nothing on the
            demo and 0.1 % on the held-out networks of ``bench/results/policy_comparison.md``
            (see ``DEFAULT_TOLERANCE``).
        patience: consecutive evaluations under T before a unit counts as converged (H).
        ref_refresh: evaluations between reference refreshes.
        warmup: optimizer steps before the first evaluation (the paper's bootstrapping stage);
            default ``total_steps // 10``.
        ref_device: where the shadow and reference models run (default CPU, as in the paper).
        asynchronous: run the evaluations in a worker thread (False: inline, for debugging).
    """

    name = "egeria"
    holds_model = True

    def __init__(self, model: nn.Module, probe_inputs: Any, *, probe_kwargs: Optional[Dict[str, Any]] = None,
                 interval: Optional[int] = None,
                 window: int = 5, tolerance: float = DEFAULT_TOLERANCE, patience: int = 2, ref_refresh: int = 10,
                 warmup: Optional[int] = None, ref_device: Any = "cpu", asynchronous: bool = True) -> None:
        super().__init__()
        interval, window, tolerance, patience, ref_refresh, warmup = map(
            plain_number, (interval, window, tolerance, patience, ref_refresh, warmup))
        if not isinstance(model, nn.Module):
            raise TypeError(f"Egeria: model must be an nn.Module, got {type(model).__name__}")
        for knob, value, low in (("interval", interval, 1), ("warmup", warmup, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"Egeria: {knob} must be an int >= {low} or None, got {value!r}")
        for knob, value, low in (("window", window, 2), ("patience", patience, 1), ("ref_refresh", ref_refresh, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Egeria: {knob} must be an int >= {low}, got {value!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < math.inf:
            raise ValueError(f"Egeria: tolerance must be a positive finite number, got {tolerance!r}")
        if ref_refresh < window + patience - 1:
            # the window restarts at each refresh: it fills after `window` evaluations, and a
            # unit needs `patience` full windows in a row before the next refresh
            raise ValueError(
                f"Egeria: ref_refresh ({ref_refresh}) < window + patience - 1 ({window + patience - 1}): the window "
                "restarts at each refresh, so no unit could stay converged for `patience` evaluations of a full "
                "window before the next one. Use ref_refresh >= window + patience - 1."
            )
        self.interval_arg, self.warmup_arg = interval, warmup
        self.interval: Optional[int] = interval
        self.warmup: Optional[int] = warmup
        self.window, self.tolerance, self.patience = window, float(tolerance), patience
        self.ref_refresh = ref_refresh
        self.asynchronous = asynchronous
        try:
            self.ref_device = torch.device(ref_device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"Egeria: ref_device={ref_device!r} is not a torch device (\"cpu\", \"cuda\", "
                             "\"cuda:1\", torch.device(...))") from exc
        if self.ref_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Egeria: ref_device={ref_device!r}, and this torch sees no CUDA device: pass "
                             "ref_device=\"cpu\" (the default).")
        self.source = model
        args, kwargs = example_call(model, probe_inputs, probe_kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if any(t.is_meta for t in tensors):
            raise ValueError("Egeria: probe_inputs hold tensors on the 'meta' device, which hold no values: pass one "
                             "batch of real inputs (on any device: they are moved to ref_device).")
        meta = [name for name, p in model.named_parameters() if p.is_meta]
        if meta:  # (the copy below fails on them with torch's words)
            raise ValueError(f"Egeria: the model's parameters are on the 'meta' device (not materialised: "
                             f"{meta[:3]}{' ...' if len(meta) > 3 else ''}): build Egeria, and the freezer, after "
                             "model.to_empty(device=...) and loading its weights.")
        if tensors and all(t.numel() == 0 for t in tensors):
            raise ValueError("Egeria: probe_inputs hold no samples (every tensor is empty): each unit's distance "
                             "would be 0/0 and nothing would ever freeze. Pass one batch with samples.")
        # a copy of its own: the caller's tensor may be an input buffer the loop refills in place
        on_ref = lambda t: t.detach().to(self.ref_device, copy=True) if isinstance(t, Tensor) else t  # noqa: E731
        self.probe_args, self.probe_kwargs = tree_map(on_ref, args), tree_map(on_ref, kwargs)
        try:  # the copies are made now, before SmartFreezer hooks the model
            self.shadow = copy_model(model, "Egeria").to(self.ref_device).eval().requires_grad_(False)
            self.reference = copy.deepcopy(self.shadow)
        except ValueError:
            raise  # copy_model's own message
        except Exception as exc:  # noqa: BLE001 - explain what to do
            from ..distributed import _is_fsdp2

            if any(_is_fsdp2(m) for m in model.modules()):  # built after fully_shard: no advice leads on
                raise ValueError(
                    "Egeria does not run under FSDP2: its copies need the model's full weights, which FSDP2 "
                    "shards across the ranks. Use Egeria under DDP (FreezableDDP), or another policy under FSDP2 "
                    "(docs/integrations/ddp_fsdp.md).") from exc
            raise RuntimeError(
                f"Egeria could not copy the model ({exc}); construct Egeria(model, probe) before "
                "SmartFreezer and before wrapping the model (DDP: pass model.module)."
            ) from exc
        self._src_tensors = list(model.parameters()) + list(model.buffers())
        self._shadow_tensors = list(self.shadow.parameters()) + list(self.shadow.buffers())
        self._ref_tensors = list(self.reference.parameters()) + list(self.reference.buffers())
        try:  # a probe the model cannot take fails here, not later on the worker thread
            with torch.no_grad(), preserved_rngs(self.shadow):
                before = _generator_states(self.ref_device)
                out = self.shadow(*self.probe_args, **self.probe_kwargs)
                # a forward that draws random numbers in eval mode (a VAE's sampling, MC dropout):
                # on a worker thread its draws would interleave with the training thread's, so
                # such a model is evaluated between steps, its draws put back (review82)
                self._draws = before != _generator_states(self.ref_device)
        except Exception as exc:  # noqa: BLE001 - explain what to do
            raise ValueError(
                f"Egeria: the model cannot run on probe_inputs ({type(exc).__name__}: {exc}). Pass one batch of "
                "its inputs: a tensor or a tuple of positional inputs, or a dict of keyword inputs "
                "(probe_kwargs= for more), on any device (they are moved to ref_device).") from exc
        if any(bool(torch.isnan(t).any()) for t in tree_leaves(out) if isinstance(t, Tensor)
               and t.layout == torch.strided and (t.is_floating_point() or t.is_complex())):
            # every unit's distance to the reference would be NaN: nothing would ever freeze (review92)
            raise ValueError("Egeria: the model's output on probe_inputs holds NaN (NaN or inf in the inputs?): "
                             "each unit's distance to the reference would be NaN, and nothing would ever freeze. "
                             "Pass one batch of finite inputs.")
        self._num_params = len(list(model.parameters()))
        pin = any(t.is_cuda for t in self._src_tensors) and self.ref_device.type == "cpu"
        self._staging = [torch.empty(t.shape, dtype=t.dtype, device=self.ref_device, pin_memory=pin)
                         for t in self._src_tensors]
        self._staged: List[Optional[Tuple[int, int]]] = [None] * len(self._staging)  # _stamp at the last copy
        self._executor: Optional[ThreadPoolExecutor] = None
        self._future: Optional[Future] = None
        self._pending: Optional[List[float]] = None  # distances of the last evaluation, if known
        self._hook_modules: List[List[nn.Module]] = []
        self._windows: List[List[float]] = []
        self._hits: List[int] = []
        self._evaluations = 0
        self._refresh_owed = False  # a refresh met weights NaN or inf: the next evaluation refreshes
        self.last_plasticity: List[float] = []
        self._stats = {"evaluations": 0, "worker_s": 0.0, "copy_s": 0.0, "wait_s": 0.0}
        self._lock = threading.Lock()
        self._pending_state: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ set-up
    def bind(self, context: PolicyContext) -> None:
        if self.shadow is None:
            raise ValueError("Egeria: this policy was closed with its freezer, and its model copies went with it: "
                             "build a new Egeria(model, probe) for a new freezer.")
        super().bind(context)
        total = context.total_steps
        if self.interval_arg is None or self.warmup_arg is None:
            if total is None or total <= 0:
                raise ValueError("Egeria: pass interval= and warmup=, or total_steps to SmartFreezer.")
        self.interval = self.interval_arg if self.interval_arg is not None else max(1, total // 50)
        self.warmup = self.warmup_arg if self.warmup_arg is not None else total // 10
        # a unit freezes at the earliest after the warm-up and `patience` evaluations of a full window
        first = self.warmup + (self.window + self.patience - 1) * self.interval
        self._warn_if_never_in_run(first + 1, f"its first freeze can come after step {first} (warm-up "
                                   f"{self.warmup}, then {self.window + self.patience - 1} evaluations every "
                                   f"{self.interval} steps)",
                                   "Pass a shorter warmup or interval.")
        if context.model is not None:
            mine = {id(p) for p in self.source.parameters()}
            if not all(id(p) in mine for p in context.model.parameters()):
                raise ValueError(
                    "Egeria was given another model than the one SmartFreezer manages (another instance, a copy, "
                    "a model built again): it would measure a model that never trains and freeze at its first "
                    "chance. Build Egeria(model, probe) on the model you train, and pass the same to SmartFreezer.")
        names = dict(self.shadow.named_modules())
        ref_names = dict(self.reference.named_modules())
        self._hook_modules = []
        for unit, measured in zip(context.units, _measured_modules(context.units)):
            if measured not in names:
                raise ValueError(
                    f"Egeria: unit {unit.index} ({unit.name}) has no module '{measured}' in the model "
                    "given to Egeria: pass the same (unwrapped) model to Egeria and SmartFreezer."
                )
            self._hook_modules.append([names[measured], ref_names[measured]])
        self._windows = [[] for _ in context.units]
        self._measured = [False] * context.num_units  # a distance seen (a unit the probe reaches)
        self._unreached_warned = False
        self._hits = [0] * context.num_units
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    # ------------------------------------------------------------------ evaluation
    def _copy_weights(self) -> Optional[Any]:
        """Weights (and buffers) into the staging buffers; a CUDA event to wait on, if any."""
        # read from the model each time: load_state_dict(assign=True) replaces its tensors
        self._src_tensors = list(self.source.parameters()) + list(self.source.buffers())
        if [t.shape for t in self._src_tensors] != [t.shape for t in self._staging]:
            raise RuntimeError("Egeria: the model's parameters or buffers changed shape or number since Egeria "
                               "copied it: build a new Egeria (and SmartFreezer) for the changed model.")
        with torch.no_grad():
            for i, (dst, src) in enumerate(zip(self._staging, self._src_tensors)):
                # a frozen parameter is copied once (and again after a write that bumps its version
                # counter: a resume's load_state_dict); a buffer always (batch norm updates its
                # running statistics without bumping the counter), a trainable parameter always
                stamp = _stamp(src) if i < self._num_params and not src.requires_grad else None
                if stamp is None or stamp != self._staged[i]:
                    dst.copy_(src.detach(), non_blocking=True)
                    self._staged[i] = stamp
        if any(t.is_cuda for t in self._src_tensors):
            event = torch.cuda.Event()
            event.record()
            return event
        return None

    def _evaluate(self, event: Any, refresh: bool, first_active: int) -> List[float]:
        """Worker: load the shadow (and, on refresh, the int8 reference), run both on the
        probe batch, return per-unit distances (nan for frozen units)."""
        start = time.perf_counter()
        if event is not None:
            event.synchronize()
        with torch.no_grad():
            for dst, src in zip(self._shadow_tensors, self._staging):
                dst.copy_(src)
            params = [src for src in self._staging[:self._num_params] if src.is_floating_point()] if refresh else []
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                # a weight NaN or inf at this step (an overflow put right after): the refresh waits for
                # the next evaluation, or the reference would measure NaN until the one after (review92:
                # freezing 35-45 steps late, checkpoints refused as damaged); a reference kept longer
                # instead made every distance small and froze all units early
                self._refresh_owed, refresh = True, False
            if refresh:
                for i, (dst, src) in enumerate(zip(self._ref_tensors, self._staging)):
                    dst.copy_(fake_quantize_int8(src) if i < self._num_params and src.is_floating_point() else src)
            outs = [self._unit_outputs(model, column, first_active)
                    for column, model in ((0, self.shadow), (1, self.reference))]
        distances = []
        for i, (a, r) in enumerate(zip(*outs)):
            if a is None or r is None:
                distances.append(float("nan"))
                continue
            a, r = a.float(), r.float()
            distances.append(float((a - r).pow(2).mean() / (a.pow(2).mean() + 1e-12)))
        with self._lock:
            self._stats["worker_s"] += time.perf_counter() - start
            self._stats["evaluations"] += 1
        return distances

    def _unit_outputs(self, model: nn.Module, column: int, first_active: int) -> List[Optional[Tensor]]:
        outputs: List[Optional[Tensor]] = [None] * len(self._hook_modules)
        hooks = []
        for i, mods in enumerate(self._hook_modules):
            if i < first_active:
                continue

            def save(module, args, out, i=i):
                if outputs[i] is None:  # a module called twice: its first call
                    t = _first_tensor(out)
                    outputs[i] = None if t is None else t.detach()

            hooks.append(mods[column].register_forward_hook(save))
        try:
            model(*self.probe_args, **self.probe_kwargs)
        finally:
            for h in hooks:
                h.remove()
        return outputs

    def _launch(self, frozen: int) -> None:
        refresh = self._evaluations % self.ref_refresh == 0 or self._refresh_owed
        self._refresh_owed = False
        t0 = time.perf_counter()
        event = self._copy_weights()
        self._stats["copy_s"] += time.perf_counter() - t0
        if refresh:
            self._windows = [[] for _ in self._windows]  # distances to a new reference start over
        if self.asynchronous and not self._draws:
            if self._executor is None:
                # torch.set_num_threads holds for the thread that called it: the worker takes the
                # same count (a new thread's default team spun beside training: 15-47 ms instead of
                # 0.3 ms an evaluation on a small MLP, review82)
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="egeria",
                                                    initializer=torch.set_num_threads,
                                                    initargs=(torch.get_num_threads(),))
            self._future = self._executor.submit(self._evaluate, event, refresh, frozen)
        else:
            with preserved_rngs(self.shadow, holders=(self.reference,)):
                self._pending = self._evaluate(event, refresh, frozen)
        self._evaluations += 1

    def _collect(self) -> Optional[List[float]]:
        if self._future is not None:
            t0 = time.perf_counter()
            # taken before its result: an evaluation that failed raises once, not at every later
            # decision and checkpoint (review82)
            future, self._future = self._future, None
            self._pending = future.result()
            self._stats["wait_s"] += time.perf_counter() - t0
        distances, self._pending = self._pending, None
        return distances

    def observe(self, distances: Sequence[float], frozen: int) -> int:
        """Feed one evaluation's per-unit distances; returns the leading converged length."""
        self.last_plasticity = [float("nan")] * len(self._windows)
        for i in range(frozen, len(self._windows)):
            d = distances[i]
            if d != d:  # nan: not measured (frozen when launched)
                continue
            self._measured[i] = True
            window = self._windows[i]
            window.append(float(d))
            del window[:-self.window]
            if len(window) == self.window:
                p = relative_slope(window)
                self.last_plasticity[i] = p
                self._hits[i] = self._hits[i] + 1 if p < self.tolerance else 0
            else:
                self._hits[i] = 0
        n = frozen
        while n < len(self._hits) and self._hits[n] >= self.patience:
            n += 1
        self._note_unreached(n)
        return n

    def _note_unreached(self, n: int) -> None:
        """Warn once where the leading run stops at a unit no evaluation has measured while the
        units after it were: the eval-mode probe pass never reaches it (a training-only auxiliary
        head, as in GoogLeNet and Inception), so it holds every unit after it unfrozen for the whole
        run (review82: 21 of 63 units)."""
        if (self._unreached_warned or n >= self.context.max_frozen or self._measured[n]
                or self._evaluations < self.window + self.patience or not any(self._measured[n + 1:])):
            return
        self._unreached_warned = True
        unit = self.context.units[n]
        warnings.warn(
            f"Egeria: unit {unit.index} ({unit.name}) has no activation to judge on the probe batch (never reached "
            "in eval mode, as a training-only auxiliary head, or all zeros there), so Egeria will not freeze it or "
            "any unit after it. Freeze such a model with another policy, or make the branch run in eval mode too.",
            stacklevel=4)

    # ------------------------------------------------------------------ policy interface
    def decides_at(self, step: int) -> bool:
        assert self.interval is not None, "bind() first"
        return step >= self.warmup and (step - self.warmup) % self.interval == 0

    def decide(self, step: int, frozen: int) -> Optional[Decision]:
        if not self.decides_at(step):
            return None
        distances = self._collect()
        target = self.observe(distances, frozen) if distances is not None else frozen
        if target < self.context.max_frozen:
            self._launch(target)
        return target if target > frozen else None

    def overhead(self) -> Dict[str, float]:
        """Seconds spent so far: ``worker_s`` reference + shadow forwards (off the training
        thread when asynchronous), ``copy_s`` and ``wait_s`` on the training thread."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        # the shadow and the staging buffers, 2x the model, serve no later evaluation: they outlived
        # close() until the freezer was collected (review103: 396 MiB for a 132 MiB model). The
        # reference is state (state_dict() still reads it): kept, on the host
        self.shadow, self.reference, self._hook_modules = None, None, []
        self._shadow_tensors, self._staging, self._staged = [], [], []
        self._ref_tensors = [t.detach().cpu() for t in self._ref_tensors]

    def state_dict(self) -> Dict[str, Any]:
        if self._future is not None:  # finish the evaluation in flight: its result is state
            future, self._future = self._future, None
            self._pending = future.result()
        return {
            "interval": self.interval, "warmup": self.warmup,
            "windows": [list(w) for w in self._windows], "hits": list(self._hits),
            "evaluations": self._evaluations,
            "pending": None if self._pending is None else list(self._pending),
            "reference": [t.detach().cpu().clone() for t in self._ref_tensors],
            "refresh_owed": self._refresh_owed,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        expected = {"interval", "warmup", "windows", "hits", "evaluations", "pending", "reference", "refresh_owed"}
        if set(state) | {"refresh_owed"} != expected:  # (saved before 2026-12-07 without it)
            raise ValueError(f"Egeria: state keys {sorted(state)} differ from {sorted(expected)}")
        if self.context is None:
            self._pending_state = dict(state)
            return
        if (state["interval"], state["warmup"]) != (self.interval, self.warmup):
            derived = (f" (from total_steps={self.context.total_steps}: the run's length changed?)"
                       if self.interval_arg is None or self.warmup_arg is None else "")
            raise ValueError(
                f"Egeria: checkpoint has interval={state['interval']}, warmup={state['warmup']}; "
                f"this run {self.interval}, {self.warmup}{derived}: construct Egeria with "
                f"interval={state['interval']}, "
                f"warmup={state['warmup']} to resume it on its schedule."
            )
        if len(state["hits"]) != len(self._hits) or len(state["reference"]) != len(self._ref_tensors):
            raise ValueError("Egeria: the checkpoint belongs to a different model")
        _check_state(state, len(self._hits), self._ref_tensors)
        self._windows = [list(w) for w in state["windows"]]
        self._hits = list(state["hits"])
        self._evaluations = int(state["evaluations"])
        self._refresh_owed = bool(state.get("refresh_owed", False))
        self._pending = None if state["pending"] is None else list(state["pending"])
        with torch.no_grad():
            for dst, src in zip(self._ref_tensors, state["reference"]):
                dst.copy_(src)

    def cost_advice(self) -> str:
        return ("Egeria's copies run the probe batch at every evaluation (policy.overhead(): worker_s), on a worker "
                "thread the training thread waits for when it is not done by the next one (wait_s), or on the "
                "training thread itself for a model that draws random numbers in eval mode: evaluate less often "
                "(interval=...), pass a smaller probe batch, or put the copies on another device (ref_device=...).")

    def describe(self) -> str:
        return (f"Egeria(interval={self.interval}, window={self.window}, tolerance={self.tolerance:g}, "
                f"patience={self.patience}, ref_refresh={self.ref_refresh}, warmup={self.warmup}, "
                f"int8 reference on {self.ref_device})")
