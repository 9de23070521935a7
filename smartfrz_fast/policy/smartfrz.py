"""SmartFRZ (Li et al., ICLR 2023): an attention predictor reads each unit's weight history.

Every ``evaluate_every`` steps, once every active unit's window is full, one ``smartfrz::predict``
call scores all active units on their device and returns the freezable prefix length as a
device tensor; the engine applies it a step later without stalling the training stream.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..history import SAMPLING
from .base import Decision, FreezePolicy, PolicyContext, plain_number

# The predictor was trained on runs snapshotted this many times from start to end, so its
# 30-snapshot window spans a quarter of a run; in use the engine is asked for the same pace.
SNAPSHOTS_PER_RUN = 120
# A unit freezes once the predictor called it freezable this many evaluations in a row (the
# engine never unfreezes, so patience > 1 trades savings for fewer early freezes). Default 1:
# the leave-one-family-out replay on the zoo picked it (docs/predictor.md, "Policy settings").
DEFAULT_PATIENCE = 1
# Each unit's probability is averaged over its evaluations (an exponential moving average from
# 0 spanning this many evaluations, alpha = 2 / (span + 1)) before it is compared with the
# threshold: the raw probability moves by ~0.1 between evaluations. Default 1 (off): measured
# on the demo and a fine-tuning job, it did not buy accuracy (docs/predictor.md, "Temporal
# agreement"), and on fine-tuning the probabilities are wrong on average, not noisy.
DEFAULT_SMOOTHING = 1
# No decision before this fraction of total_steps: the predictor's window spans a quarter of a
# run, and the floor of the snapshot interval alone would fill it earlier (20 % at 300 steps).
DEFAULT_MIN_PROGRESS = 0.25
# A unit freezes only once it moves at most half as far per window as in its first window:
# measured in use on 22 networks (-0.36 points against -0.53 without it, for 19.1 % of the FLOPs
# against 20.6 %) and on a fine-tuning job (-2 points against -6): docs/predictor.md, "Settling".
DEFAULT_SETTLE_RATIO = 0.5
# A freeze happens only once the prefix it leaves frozen holds this share of the model's forward
# FLOPs: an embedding alone saves almost nothing, and freezing it early cost attention models
# up to 0.7 points (docs/predictor.md, "Minimum saving": 22 networks, -0.04 points against -0.13
# at the same 13.2 % of the FLOPs).
DEFAULT_MIN_FLOPS_SHARE = 0.02
# Units that compute attention (a transformer's blocks) do not freeze unless asked: freezing
# them cost 0.9-2.8 points on every encoder measured (ViTs, text encoders, a fine-tuned
# encoder), and nothing in the weight history told those freezes from safe ones
# (docs/predictor.md, "Attention models").
DEFAULT_FREEZE_ATTENTION = False
# The predictor reads each snapshot standardised over the unit's sampled weights: one weight (a
# PReLU's slope, a learned temperature) reads as zeros whatever it does (the shipped weights
# answer 0.52), two as +-1. A unit of fewer weights than this takes the vote of the unit before
# it, as a norm layer is part of the layer it follows (review38).
MIN_READABLE_WEIGHTS = 4


def snapshot_interval(total_steps: int, snapshots: int = SNAPSHOTS_PER_RUN) -> int:
    """Steps between weight snapshots for a run of ``total_steps`` optimizer steps."""
    return max(1, int(total_steps) // snapshots)


class SmartFRZ(FreezePolicy):
    """The SmartFRZ attention predictor as a freezing policy.

    Args:
        weights: predictor file (default: the shipped weights, or ``$SMARTFRZ_PREDICTOR``).
        threshold: a unit is freezable when its probability (averaged, see ``smoothing``)
            reaches this.
        evaluate_every: score every this many steps (default: once per new snapshot).
        patience: evaluations in a row a unit must be freezable before it freezes.
        smoothing: span, in evaluations, of the moving average of each unit's probability
            (1: the raw probability). The average starts from 0 (not freezable).
        min_progress: no decision before ``ceil(min_progress * total_steps)`` steps (the
            predictor's window spans a quarter of a run); without ``total_steps`` there is no
            such guard and SmartFreezer warns.
        settle_ratio: a unit may freeze only once its sampled weights move, over the window,
            at most this many times as far as over its first full window (default 0.5; None: no
            such condition). The predictor sees movement relative to the weights' spread, which
            pretrained weights keep small from the start; this compares a unit with its own
            start of the run (``docs/predictor.md``, "Settling").
        min_flops_share: freeze only once the frozen prefix would hold at least this share of
            the model's backward FLOPs, what freezing it saves (default 0.02; 0: no such
            condition; for an ordinary model the same share as of its forward FLOPs). A prefix
            of almost no compute (an embedding, a LoRA adapter) waits until the units after it
            may freeze too.
        freeze_attention: let units that compute attention freeze (default False: the frozen
            prefix stops before the first one, so a transformer freezes at most what precedes
            its first attention layer). On the encoders measured, freezing them lost 0.9-2.8
            points whatever the predictor said; set True only where you have measured that it
            does not on your own job.
    """

    name = "smartfrz"
    needs_history = True
    # score every unit of last_rows at each evaluation on the CPU too, not only as far as the
    # freezable prefix goes (probes of the predictor, tests); the decisions are the same
    score_every_unit = False

    def __init__(self, weights: Optional[Union[str, Path]] = None, threshold: float = 0.5,
                 evaluate_every: Optional[int] = None, patience: int = DEFAULT_PATIENCE,
                 smoothing: int = DEFAULT_SMOOTHING, min_progress: float = DEFAULT_MIN_PROGRESS,
                 settle_ratio: Optional[float] = DEFAULT_SETTLE_RATIO,
                 min_flops_share: float = DEFAULT_MIN_FLOPS_SHARE,
                 freeze_attention: bool = DEFAULT_FREEZE_ATTENTION):
        super().__init__()
        threshold, evaluate_every, patience, smoothing, min_progress, settle_ratio, min_flops_share = map(
            plain_number, (threshold, evaluate_every, patience, smoothing, min_progress, settle_ratio, min_flops_share))
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"SmartFRZ threshold is a probability in (0, 1), got {threshold!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"SmartFRZ patience is a number of evaluations >= 1, got {patience!r}")
        if evaluate_every is not None and (isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int)
                                           or evaluate_every < 1):
            raise ValueError(f"SmartFRZ evaluate_every is a number of steps >= 1, or None, got {evaluate_every!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1:
            raise ValueError(f"SmartFRZ smoothing is an averaging span in evaluations >= 1 (1: none), got {smoothing!r}")
        if isinstance(min_progress, bool) or not isinstance(min_progress, (int, float)) or not 0.0 <= min_progress < 1.0:
            raise ValueError(f"SmartFRZ min_progress is a fraction of total_steps in [0, 1), got {min_progress!r}")
        if settle_ratio is not None and (isinstance(settle_ratio, bool) or not isinstance(settle_ratio, (int, float))
                                         or not 0.0 < settle_ratio <= 1.0):
            raise ValueError(f"SmartFRZ settle_ratio is a movement ratio in (0, 1], or None, got {settle_ratio!r}")
        if isinstance(min_flops_share, bool) or not isinstance(min_flops_share, (int, float)) \
                or not 0.0 <= min_flops_share < 1.0:
            raise ValueError(f"SmartFRZ min_flops_share is a share of the model's FLOPs in [0, 1), got {min_flops_share!r}")
        if not isinstance(freeze_attention, bool) and type(freeze_attention).__name__ != "bool_":  # numpy's too
            raise ValueError(f"SmartFRZ freeze_attention is True or False, got {freeze_attention!r}")
        from ..predictor import load_predictor

        # Loaded now, so that missing or corrupt weights fail before training starts.
        self.predictor = load_predictor(weights)
        if self.predictor.history_sampling != SAMPLING:
            warnings.warn(f"these SmartFRZ weights were trained on weight histories sampled as "
                          f"{self.predictor.history_sampling!r}; the engine samples {SAMPLING!r} "
                          "(smartfrz_fast.history.SAMPLING), so their predictions may be off. Retrain them "
                          "(`python -m smartfrz_fast.lab.rebuild`, docs/predictor.md) or use the shipped weights.",
                          stacklevel=2)
        self.threshold = threshold
        self.evaluate_every = evaluate_every
        self.patience = patience
        self.smoothing = smoothing
        self.min_progress = float(min_progress)
        self.settle_ratio = None if settle_ratio is None else float(settle_ratio)
        self.min_flops_share = float(min_flops_share)
        self.freeze_attention = bool(freeze_attention)
        self.attention_stop: Optional[int] = None  # the first unit that computes attention, unless freeze_attention
        self._limit = 0  # the longest prefix this policy may freeze (set by bind)
        self._frozen_nothing_why: Optional[str] = None  # why _limit is 0, where a prefix could freeze (bind)
        self._shared_limit = 0  # the same from what every rank shares (see bind)
        self._prefix_share: Optional[torch.Tensor] = None  # [U + 1]: share of the FLOPs of each prefix length
        self.first_decision_step = 0  # set by bind() from total_steps
        # the units the policy may still freeze, from the first active one (see _scored_rows)
        self.last_rows: Optional[torch.Tensor] = None
        # the predictor's, one per unit of last_rows (a unit too small to read: its neighbour's;
        # NaN: not scored, see _leading_probabilities)
        self.last_probabilities: Optional[torch.Tensor] = None
        self.last_smoothed: Optional[torch.Tensor] = None  # what was compared with the threshold
        self._evaluated_at = -1  # history.count at the last evaluation
        # [U] int32 on the device: evaluations in a row each unit was called freezable
        self._streak: Optional[torch.Tensor] = None
        # [U] float32 on the device: each unit's averaged probability
        self._average: Optional[torch.Tensor] = None
        # [U] float32 on the device: each unit's movement over its first full window (NaN: not yet)
        self._first_move: Optional[torch.Tensor] = None
        # for report(), since the freezer was built or resumed: evaluations, and each unit's
        # highest probability, as predicted and once the settle guard had its say ([U] on the device)
        self._evaluations = 0
        self._best: Dict[str, Optional[torch.Tensor]] = {"predicted": None, "settled": None}
        self._held_by_share = None  # [] bool on the device: min_flops_share turned a prefix down

    @staticmethod
    def sample_every_for(total_steps: Optional[int]) -> int:
        """The engine's snapshot interval when the user gives none: the pace the predictor
        was trained at (``SNAPSHOTS_PER_RUN`` per run); every step without ``total_steps``,
        with a warning, since the window then spans ``window`` steps, not a quarter of the run."""
        if total_steps:
            return snapshot_interval(total_steps)
        warnings.warn(
            "SmartFRZ paces its weight history by the run's length, and SmartFreezer was given no "
            "total_steps: it snapshots every step, so its window spans only `window` (30) steps and it "
            "may start freezing at step 30 whatever the run's length (the demo's model over 750 steps: "
            "56 % of the FLOPs saved instead of 41 %, 0.44 points more lost). Pass total_steps=<optimizer "
            "steps in the run> to SmartFreezer (or sample_every=total_steps // 120 if the freezer cannot "
            "know it).", UserWarning, stacklevel=3)
        return 1

    def state_dict(self) -> Dict[str, Any]:
        # which snapshot was scored last (a resumed run must not score it again), streaks, averages
        def host(t):
            return None if t is None else t.detach().cpu().clone()  # a copy, not a view

        return {"evaluated_at": self._evaluated_at, "streak": host(self._streak), "average": host(self._average),
                "first_move": host(self._first_move), "weights_digest": self.predictor.digest}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # checked whole before anything changes: a wrong-shape streak would fail at the next step
        keys = {"evaluated_at", "streak", "average", "first_move", "weights_digest"}
        if not isinstance(state, dict) or set(state) - keys:
            raise ValueError(f"SmartFRZ: policy state {state!r:.80} is not SmartFRZ.state_dict()'s {sorted(keys)}")
        evaluated_at, streak, average = state.get("evaluated_at", -1), state.get("streak"), state.get("average")
        first_move = state.get("first_move")
        if isinstance(evaluated_at, bool) or not isinstance(evaluated_at, int) or evaluated_at < -1:
            raise ValueError(f"SmartFRZ: policy state evaluated_at={evaluated_at!r} is not a snapshot count (>= -1)")
        units = self.context.num_units if self.context is not None else None

        def check(name, t, dtype, valid, expected):
            if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == 1
                                      and (units is None or t.numel() == units) and bool(valid(t).all())):
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"SmartFRZ: policy state {name} is {what}; expected {str(dtype).replace('torch.', '')} ({units},) {expected} "
                                 "(one per unit): the checkpoint is corrupt or from another model.")

        check("streak", streak, torch.int32, lambda t: t >= 0, "counts >= 0")
        check("average", average, torch.float32, lambda t: ((t >= 0) & (t <= 1)) | t.isnan(), "probabilities in [0, 1]")
        check("first_move", first_move, torch.float32, lambda t: (t >= 0) | t.isnan(), "movements >= 0")
        saved_digest = state.get("weights_digest")  # absent in checkpoints older than this check
        if saved_digest is not None and saved_digest != self.predictor.digest:
            warnings.warn(  # weights=, $SMARTFRZ_PREDICTOR or a new release's shipped weights
                f"SmartFRZ: the checkpoint was made with other predictor weights (digest {str(saved_digest)[:12]}, "
                f"these are {self.predictor.digest[:12]}): the resumed run will not decide as the saved one would. "
                "Pass the checkpoint's weights file as SmartFRZ(weights=...) to continue it exactly.",
                UserWarning, stacklevel=3)
        self._evaluated_at = evaluated_at
        self._streak = None if streak is None else streak.clone()
        self._average = None if average is None else average.clone()
        # an inf reference (saved before 2026-12-07, after an inf snapshot) counted the unit as
        # settled for good: not a reference (review94)
        self._first_move = None if first_move is None else first_move.masked_fill(first_move.isinf(), float("nan"))

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        config = self.predictor.config
        history = context.history
        if (history.sample_size, history.window) != (config.sample_size, config.window):
            raise ValueError(
                f"the SmartFRZ predictor was trained on windows of {config.window} snapshots of "
                f"{config.sample_size} weights; the engine records {history.window} x "
                f"{history.sample_size}. Construct SmartFreezer with window={config.window}, "
                f"sample_size={config.sample_size}."
            )
        self.predictor.to(context.device)
        self._weights = [w.detach() for w in self.predictor.flat_weights()]
        # the input transform the weights were trained with (1: none; see amplify_deviation)
        self.input_gain = float(self.predictor.provenance.get("input_gain", 1.0))
        self.sort_inputs = bool(self.predictor.provenance.get("sort_by_newest", False))
        # the documented guard, exact: the first decision after ceil(min_progress * total_steps)
        total = context.total_steps
        self.first_decision_step = math.ceil(self.min_progress * total) if total else 0
        # the share of a step's work the prefix saves (on a LoRA model its base layers' forward
        # would count a prefix of adapters as a large saving)
        flops = torch.tensor([0.0] + [float(u.forward_flops if u.backward_flops is None else u.backward_flops)
                                      for u in context.units], dtype=torch.float64)
        share = None
        if flops.sum() > 0 and self.min_flops_share > 0:  # unknown FLOPs (all 0): no such condition
            share = (flops.cumsum(0) / flops.sum()).to(torch.float32)
            self._prefix_share = share.to(context.device)
        if not self.freeze_attention:
            self.attention_stop = next((u.index for u in context.units if u.attention), None)
        longest = context.max_frozen if self.attention_stop is None else min(context.max_frozen, self.attention_stop)
        self._limit = longest
        if share is not None and float(share[longest]) < self.min_flops_share:
            self._limit = 0  # no prefix it may freeze holds enough of the FLOPs
        self._frozen_nothing_why = None
        if self._limit == 0 and context.max_frozen > 0:  # (none at all: the engine says so)
            self._warn_nothing_can_freeze(share)
        # what decides_at() and the snapshots go by: every rank's the same. Under torch.distributed
        # the FLOP shares come from each rank's own set-up batch (another sequence length), so a
        # rank whose shares ruled every prefix out stopped taking part in rank 0's broadcasts: a hang
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._shared_limit = longest if distributed else self._limit

    def _warn_nothing_can_freeze(self, share: Optional[torch.Tensor]) -> None:
        """A run that will never freeze (a transformer whose units before its first attention
        layer are token embeddings, a model whose head holds nearly all the compute): say so
        at the start, not after the run."""
        from ..guards import user_stacklevel, warn_in_every_run

        stop, longest = self.attention_stop, self.context.max_frozen
        if stop is not None and stop <= longest:
            unit, held = self.context.units[stop], 0.0 if share is None else float(share[stop])
            message = (f"it stops before the first unit that takes part in attention ({unit.name!r}, in "
                       f"{unit.attention!r}), and the {stop} unit(s) before it hold {held:.1%} of the FLOPs "
                       f"(min_flops_share={self.min_flops_share:g}). On the encoders measured, freezing attention "
                       "layers when the predictor said so lost 0.9-2.8 points (docs/predictor.md, \"Attention "
                       "models\"). To freeze them anyway, measure SmartFRZ(freeze_attention=True) or a schedule "
                       "policy (LinearFreeze, FreezeOut) against full training on your job.")
        else:
            message = (f"the {longest} unit(s) it may freeze (all but the units SmartFreezer keeps trainable) hold "
                       f"{float(share[longest]):.1%} of the FLOPs freezing them saves, under "
                       f"min_flops_share={self.min_flops_share:g}. Pass SmartFRZ(min_flops_share=0) to let them "
                       "freeze anyway.")
        self._frozen_nothing_why = message  # report() says it too (it said "evaluated nothing yet", review99)
        warn_in_every_run(f"SmartFRZ will freeze nothing on this model: {message}", user_stacklevel())

    def _as_far_as_it_may(self) -> bool:
        """The frozen prefix reached the longest this policy may freeze (the engine's
        ``max_frozen``, cut at the attention stop; none at all when no such prefix holds
        ``min_flops_share``, except under torch.distributed: see bind): nothing is left to score.
        Scoring every unit after it went on all run (4.2 ms of a 6.6 ms step on a small
        fine-tuned transformer). From what every rank shares (decides_at, the snapshots)."""
        return self.context.history.first_active >= self._shared_limit

    def wants_snapshots(self) -> bool:
        return not self._as_far_as_it_may()

    def _scored_rows(self) -> torch.Tensor:
        """The history rows of the units this policy may still freeze: the active ones before
        its limit. The predictor reads each unit's window alone, so the units after the limit
        (a transformer's attention layers, the kept head) change no decision; scoring them cost
        a model that freezes nothing 15 ms of a 22 ms step."""
        history = self.context.history
        return history.rows[:max(0, self._limit - history.first_active)]

    def decides_at(self, step: int) -> bool:
        # from what every rank shares (step, history.count): under DDP rank 0 broadcasts only here
        history = self.context.history
        if not history.full or step < self.first_decision_step or self._as_far_as_it_may():
            return False
        if self.evaluate_every is None:
            return history.count != self._evaluated_at
        return step % self.evaluate_every == 0 and history.count != self._evaluated_at

    def decide(self, step: int, frozen: int) -> Optional[Decision]:
        history = self.context.history
        if not history.full or self._as_far_as_it_may():  # (every unit frozen is as far too)
            return None
        if self.evaluate_every is not None and step % self.evaluate_every:
            return None
        # at most once per snapshot (default: every new one): scoring the same history again
        # would count it twice towards patience and smoothing
        if history.count == self._evaluated_at:
            return None
        self._evaluated_at = history.count
        decide = step >= self.first_decision_step
        rows = self._scored_rows()
        if rows.numel() == 0:  # (under torch.distributed, where no prefix holds min_flops_share)
            return None
        memoryless = self.patience == 1 and self.smoothing == 1  # no streak or average to keep
        # on the CPU, where host reads are free, only as far along the units as the prefix goes
        leading = memoryless and history.history.device.type == "cpu" and not self.score_every_unit
        if not decide and memoryless:  # before the guard: only each unit's first window to note
            if self.settle_ratio is not None:
                self._settled(rows.index_select(0, self._first_window_pending(rows).to(rows.device)) if leading
                              else rows)
            return None
        from .. import ops

        if leading:
            prob, settled = self._leading_probabilities(rows)
        else:  # one launch on a GPU, with no host sync; every unit where streaks or averages are kept
            settled = None if self.settle_ratio is None else self._settled(rows)
            prob = self._small_units_follow_their_neighbour(rows, self._predict(rows))
        self.last_rows, self.last_probabilities, self.last_smoothed = rows, prob, prob
        self._evaluations += 1
        self._note_best("predicted", rows, prob)
        if memoryless and self.settle_ratio is None:
            return self._worth_freezing(ops.reference.freezable_prefix(prob, self.threshold) + history.first_active)
        if settled is not None:  # not freezable while the unit still moves as at its start
            prob = torch.where(settled, prob, torch.zeros_like(prob))
            self.last_smoothed = prob
        self._note_best("settled", rows, prob)
        # before the guard, evaluations feed the averages and streaks but decide nothing
        # device ops only (no host sync)
        units = history.history.shape[0]
        if self.smoothing > 1:  # average each unit's probability over its evaluations
            # from 0 (not freezable): a unit needs several confident evaluations to clear the
            # threshold, more the nearer its probabilities sit to it
            self._average = self._state_tensor(self._average, units, 0.0, torch.float32, prob.device)
            old = self._average.index_select(0, rows)
            prob = old + (2.0 / (self.smoothing + 1)) * (prob - old)
            self._average.index_copy_(0, rows, prob)
            self.last_smoothed = prob
        # count the evaluations in a row each active unit cleared the threshold, and freeze the
        # leading run of units that did so `patience` times
        self._streak = self._state_tensor(self._streak, units, 0, torch.int32, prob.device)
        streak = torch.where(prob >= self.threshold, self._streak.index_select(0, rows) + 1, 0).to(torch.int32)
        self._streak.index_copy_(0, rows, streak)
        if not decide:
            return None
        ready = (streak >= self.patience).to(torch.int64)
        return self._worth_freezing(torch.cumprod(ready, 0).sum() + history.first_active)

    def _predict(self, rows: torch.Tensor) -> torch.Tensor:
        """The predictor's probability for each unit of ``rows``; the op applies the input
        transform of training while it reads each window (fused on CUDA)."""
        from .. import ops

        history = self.context.history
        return ops.predict(history.history, history.cursor, rows, history.valid, self._weights, self.threshold,
                           self.input_gain, self.sort_inputs)[0]

    def _vote_sources(self, rows: torch.Tensor) -> torch.Tensor:
        """``[R]``: for each unit of ``rows``, the position among ``rows`` whose probability it
        takes: its own, or for a unit of fewer than ``MIN_READABLE_WEIGHTS`` valid weights the
        nearest readable unit before it (after it, for the first ones). Device ops only."""
        valid = self.context.history.valid
        small = valid.index_select(0, rows.to(valid.device)) < MIN_READABLE_WEIGHTS
        count = small.shape[0]
        index = torch.arange(count, device=small.device)
        before = torch.cummax(torch.where(small, -1, index), 0).values
        after = torch.where(small, count, index).flip(0).cummin(0).values.flip(0)
        return torch.where(before >= 0, before, torch.where(after < count, after, index))

    def _small_units_follow_their_neighbour(self, rows: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        return prob.index_select(0, self._vote_sources(rows).to(prob.device))

    def _first_window_pending(self, rows: torch.Tensor) -> torch.Tensor:
        """The positions among ``rows`` (on the CPU) of the units whose first window's movement is
        not recorded yet (host read)."""
        first = self._first_move
        if first is None:
            return torch.arange(rows.shape[0])
        return first.index_select(0, rows.to(first.device)).isnan().cpu().nonzero().flatten()

    def _leading_probabilities(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(prob, settled)`` for the units of ``rows`` as far as the freezable prefix goes: each
        unit's probability (its vote source's, as ``_small_units_follow_their_neighbour``), NaN
        after; whether it is settled (``_settled``), False where not looked at. The prefix ends at
        the first unit not settled or below the threshold, most evaluations at the first. On the
        CPU each unit scored costs about 0.75 ms and each settle check 0.25 ms: a 6-unit MLP with
        4 ms steps spent more time in SmartFRZ than in training, and mobilenet_v3_small 9.5 s of
        a 39 s run (review104). Looked at in chunks of 1, 2, 4, ... units from the first, which
        is always scored (report() names its best score); a unit's first window is recorded at
        its first evaluation wherever the prefix ends. The prefix is the one looking at every
        unit gives (tested), at a near-tie up to float rounding: a unit's probability moves by up
        to about 1e-6 with the number of units scored together (review106: 8.8e-7)."""
        sources = self._vote_sources(rows).cpu()
        count = sources.shape[0]
        raw = torch.full((count,), float("nan"))
        settled = torch.full((count,), self.settle_ratio is None)
        looked = settled.clone()  # settle checked (every unit is, without a settle_ratio)

        def look(positions: torch.Tensor) -> None:
            if positions.numel():
                settled[positions] = self._settled(rows.index_select(0, positions.to(rows.device))).cpu()
                looked[positions] = True

        if self.settle_ratio is not None:
            look(self._first_window_pending(rows))
        known, chunk = 0, 1
        while True:
            end = min(count, known + chunk)
            look((~looked[:end]).nonzero().flatten())
            unsettled = (~settled[:end]).nonzero().flatten()
            stop = int(unsettled[0]) if unsettled.numel() else end  # the prefix cannot pass a unit not settled
            need = sources[:max(1, stop)].unique()
            need = need[raw.index_select(0, need).isnan()]
            if need.numel():
                raw[need] = self._predict(rows.index_select(0, need.to(rows.device))).float().cpu()
            if stop < end or end >= count or bool((raw.index_select(0, sources[:stop]) < self.threshold).any()):
                return raw.index_select(0, sources).to(rows.device), settled.to(rows.device)
            known, chunk = end, chunk * 2

    def _worth_freezing(self, prefix: torch.Tensor) -> torch.Tensor:
        """``prefix``, or 0 (no change) while that prefix holds less than ``min_flops_share`` of
        the FLOPs. The share is that of what the engine would freeze: the prefix cut to
        ``max_frozen`` (a prefix reaching the kept head passed on the head's FLOPs alone), and
        before the first unit that computes attention unless ``freeze_attention``. Device ops only."""
        if self.attention_stop is not None:
            prefix = prefix.clamp(max=self.attention_stop)
        if self._prefix_share is None:
            return prefix
        prefix = prefix.clamp(max=self.context.max_frozen)
        share = self._prefix_share.index_select(0, prefix.reshape(1).to(self._prefix_share.device)).reshape(prefix.shape)
        refused = (share < self.min_flops_share) & (prefix > self.context.history.first_active)
        self._held_by_share = refused if self._held_by_share is None else self._held_by_share | refused.to(
            self._held_by_share.device)
        return torch.where(share >= self.min_flops_share, prefix, torch.zeros_like(prefix))

    def _note_best(self, kind: str, rows: torch.Tensor, prob: torch.Tensor) -> None:
        """Each unit's highest ``kind`` probability so far (device ops only)."""
        best = self._state_tensor(self._best[kind], self.context.history.history.shape[0], 0.0, torch.float32,
                                  prob.device)
        best.index_copy_(0, rows, torch.fmax(best.index_select(0, rows), prob.float()))  # NaN: not scored
        self._best[kind] = best

    def _settled(self, rows: torch.Tensor) -> torch.Tensor:
        """``[R]`` bool per unit of ``rows``: its movement over the window (newest minus oldest
        snapshot, over its valid positions) is at most ``settle_ratio`` times its first
        window's, or it did not move at all over the window (an lr of 0: nothing to learn).
        The first window is the first one that starts with the unit moving: one that starts in
        a stretch where the user's code held it frozen (a warm-up of the head, gradual
        unfreezing; the engine holds back its freeze meanwhile) would be a reference of 0 or of
        a few steps' movement, and hold it back for good. Nor is a movement that is not finite (a
        snapshot taken while a weight was inf, put right after: an inf reference would count the
        unit as settled for the rest of the run, review92). Device ops only."""
        history = self.context.history
        h, t = history.history, history.window
        oldest_first = torch.remainder(history.cursor + torch.arange(t, device=h.device), t)
        window = h.index_select(0, rows).index_select(1, oldest_first)  # [R, T, K]
        valid = history.valid.to(h.device).index_select(0, rows)
        mask = (torch.arange(h.shape[2], device=h.device)[None, :] < valid[:, None])[:, None, :]
        steps = torch.where(mask, window[:, 1:] - window[:, :-1], torch.zeros_like(window[:, 1:]))  # [R, T-1, K]
        moved = steps.abs().amax(dim=2) > 0  # [R, T-1]: from each snapshot to the next
        move = steps.sum(dim=1).norm(dim=1)
        self._first_move = self._state_tensor(self._first_move, h.shape[0], float("nan"), torch.float32, h.device)
        first = self._first_move.index_select(0, rows)
        first = torch.where(first.isnan() & moved[:, 0] & move.isfinite(), move, first)
        self._first_move.index_copy_(0, rows, first)
        return (move <= self.settle_ratio * first) | ~moved.any(dim=1)  # (False while first is NaN)

    @staticmethod
    def _state_tensor(t: Optional[torch.Tensor], units: int, fill, dtype, device) -> torch.Tensor:
        """A per-unit state tensor on ``device``: a new one filled with ``fill``, or ``t`` moved there."""
        if t is None:
            return torch.full((units,), fill, dtype=dtype, device=device)
        return t.to(device)

    def describe(self) -> str:
        return (f"SmartFRZ(threshold={self.threshold}, patience={self.patience}, smoothing={self.smoothing}, "
                f"min_progress={self.min_progress:g}, settle_ratio={self.settle_ratio}, "
                f"min_flops_share={self.min_flops_share:g}, freeze_attention={self.freeze_attention}, "
                f"evaluate_every={self.evaluate_every}, window={self.predictor.config.window}, "
                f"K={self.predictor.config.sample_size})")

    def cost_advice(self) -> str:
        return ("SmartFRZ's predictor costs about 0.75 ms per unit it scores on one CPU thread (plus about 1 ms an "
                "evaluation; from the first unit not frozen as far as the freezable prefix goes, most evaluations "
                "the first unit alone), one evaluation per snapshot from a quarter of the run, whatever a training "
                "step costs: evaluate less often "
                "(SmartFRZ(evaluate_every=...)), train on a GPU (one kernel launch per evaluation), or use a schedule "
                "policy (LinearFreeze: about 0.1 ms per step). python -m smartfrz_fast.profile measures it on your "
                "model.")

    def report_lines(self) -> List[str]:
        lines = [self._decisions_line()]
        if self.attention_stop is not None:
            unit = self.context.units[self.attention_stop]
            lines.append(f"SmartFRZ freezes at most the {self.attention_stop} unit(s) before {unit.name!r}, the first "
                         f"that takes part in attention (in {unit.attention!r}; freeze_attention=True lets it and "
                         "those after it freeze)")
        return lines

    def _decisions_line(self) -> str:
        """What held the next unit back, so that "nothing frozen" says why (review88): no
        evaluation yet, its highest probability against the threshold, the settle guard, or
        min_flops_share."""
        history = self.context.history
        if self._frozen_nothing_why is not None:
            return f"SmartFRZ freezes nothing on this model: {self._frozen_nothing_why}"
        first = history.first_active
        if first >= len(self.context.units):
            return f"SmartFRZ: {self._evaluations} evaluations; every unit is frozen"
        if 0 < self._limit <= first:  # nothing is scored any more: "scored at most 0.00" named no score
            stop = self.attention_stop
            beyond = (f"from {self.context.units[stop].name!r} on, units take part in attention"
                      if stop is not None and stop <= first else "the units after it are kept trainable (keep_trainable)")
            return (f"SmartFRZ: {self._evaluations} evaluations since the freezer was built or resumed; the frozen "
                    f"prefix ({first} unit(s)) is as long as SmartFRZ lets it grow: {beyond}")
        if not self._evaluations:
            when = "its window is full" if history.full else (
                f"its window holds {min(history.count, history.window)} of the {history.window} snapshots it needs "
                "(sample_every sets how often one is taken)")
            return (f"SmartFRZ has evaluated nothing yet since the freezer was built or resumed: {when}, and its "
                    f"first decision comes at step {self.first_decision_step} (min_progress={self.min_progress:g})")
        name = self.context.units[first].name
        predicted = float(self._best["predicted"][first]) if self._best["predicted"] is not None else 0.0
        line = (f"SmartFRZ: {self._evaluations} evaluations since the freezer was built or resumed; the next unit, "
                f"{name!r}, scored at most {predicted:.2f} in the evaluations that scored it (threshold "
                f"{self.threshold:g})")
        if self.settle_ratio is not None and self._best["settled"] is not None:
            settled = float(self._best["settled"][first])
            if predicted >= self.threshold > settled:
                line += (f", but never while settled (settle_ratio={self.settle_ratio:g}: its movement over the window "
                         "stayed above that share of its first window's)")
        if self._held_by_share is not None and bool(self._held_by_share):
            line += (f"; a prefix the predictor called freezable held less than min_flops_share="
                     f"{self.min_flops_share:g} of a step's FLOPs, and was let be")
        return line
