"""Train the attention predictor on either label source; split by architecture family.

    python -m smartfrz_fast.lab.train            # collect (resumable) + CKA labels + train + ship
    python -m smartfrz_fast.lab.train --labels trials --trials DIR   # labels from freezing trials
    python -m smartfrz_fast.lab.train --quick    # tiny end-to-end run (CI), to a temp file

The shipped predictor is trained on every family. How it does on an architecture it has never
seen is measured by leaving one family out at a time (``--leave-one-out DIR``: one predictor per
family, trained on the others, scored on the one left out by ``scoring.offline_metrics`` and
used in ``evaluate`` as the ``smartfrz-unseen`` policy). Each file records its split, the label
rule, the data, the git commit and the metrics in its provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..history import SAMPLING
from ..predictor.model import DEFAULT_WEIGHTS, AttentionPredictor, PredictorConfig, load_predictor, save_predictor
from .collect import collect
from .labels import DEFAULT_THRESHOLD, LABEL_SOURCES, LabelSource, RunData, Tolerance, label_summary, load_runs
from .scoring import INPUT_GAIN, SORT_BY_NEWEST, offline_metrics, window_logits
from .zoo import FAMILIES, RunSpec, zoo_specs

TRAIN_FAMILIES = FAMILIES  # the shipped file; --leave-one-out measures unseen families
# AdamW one-cycle peak lr, with gradients clipped to norm 1: at 3e-3 unclipped, one of the
# leave-one-family-out trainings (resnet left out) stuck at chance (loss 0.64-0.69 for all 25
# epochs, balanced accuracy 0.50 on every family); 1e-3 clipped learned on the same split.
LEARNING_RATE = 1e-3
TRAIN_STEPS = 540  # optimizer steps (one run per step): epochs = TRAIN_STEPS / runs, at least 10
# A training whose predictor stays near chance on a family of its own training runs never took off
# (seen once with per-tensor standardised inputs: balanced accuracy 0.50, one answer for every
# window, on three of eight families, loss 0.61 -> 0.56); another seed learned. Judged on the
# metrics computed anyway, over the families whose labels hold both answers; the zoo's CKA
# trainings reach 0.73 or more on every family.
STUCK_BALANCED_ACCURACY = 0.6
TRAINING_SEEDS = (0, 1, 2)  # tried in turn while a training stays stuck


def _augment(x: Tensor, valid: Tensor, g: torch.Generator, permute: bool = True) -> Tensor:
    """Label-preserving: the K sampled positions are an arbitrary draw (permute the valid ones
    per unit; masked ones stay last) and a weight vector's dynamics do not depend on its sign."""
    u, _, k = x.shape
    position = torch.arange(k).expand(u, k)
    keys = torch.where(position < valid[:, None], torch.rand(u, k, generator=g), 2.0 + position)
    if permute:
        perm = torch.argsort(keys, dim=1)
        x = torch.gather(x, 2, perm[:, None, :].expand_as(x))
    sign = torch.where(torch.rand(u, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    return x * sign


def train_predictor(runs: Sequence[RunData], epochs: int = 30,
                    lr: float = LEARNING_RATE, seed: int = 0, ends_per_step: int = 8, gain: float = INPUT_GAIN,
                    permute: bool = False, max_grad_norm: float = 1.0, log=print) -> AttentionPredictor:
    """Each step: one run, all its units, ``ends_per_step`` random window ends; labels are the
    runs' own (``RunData.labels``: CKA or freezing trials, as loaded)."""
    torch.manual_seed(seed)
    model = AttentionPredictor(PredictorConfig())
    t = model.config.window
    runs = [r for r in runs if r.history.shape[1] >= t]
    labels = [r.labels(t) for r in runs]
    pos = float(sum(l.sum() for l in labels))
    total = float(sum(l.numel() for l in labels))
    # balanced classes: each class carries half of the loss
    weight = torch.tensor([total / max(2 * (total - pos), 1.0), total / max(2 * pos, 1.0)])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * len(runs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total_loss = 0.0
        for i in torch.randperm(len(runs), generator=g).tolist():
            run = runs[i]
            ends = torch.randint(t - 1, run.history.shape[1], (ends_per_step,), generator=g)
            x = _augment(run.history, run.valid, g, permute)
            logits = window_logits(model, x, run.valid, ends, gain)
            target = labels[i][:, ends - (t - 1)].long()
            loss = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1), weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            total_loss += loss.item()
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(runs):.4f}")
    return model.eval()


def _train_until_it_learns(train_runs: Sequence[RunData], quick: bool, log, **kwargs):
    """``train_predictor`` at the first of ``TRAINING_SEEDS`` whose predictor is not stuck near
    chance on its own training runs (its lowest balanced accuracy over their families, of those
    whose labels say both "freeze" and "not yet"); if every seed stays stuck, the best of them,
    said loudly. A quick run's two epochs are not judged. Returns the model, its metrics on the
    training runs and one record per attempt (``kept``: the one returned)."""
    window = PredictorConfig().window
    answers: Dict[str, set] = {}
    for run in train_runs:
        answers.setdefault(run.family, set()).update(run.labels(window).unique().tolist())
    judged = sorted(family for family, seen in answers.items() if len(seen) == 2)
    attempts, tried = [], []
    for seed in TRAINING_SEEDS[:1] if quick else TRAINING_SEEDS:
        model = train_predictor(train_runs, seed=seed, **kwargs)
        metrics = offline_metrics(model, train_runs, gain=kwargs.get("gain"))
        fit = min((metrics[family]["balanced_accuracy"] for family in judged), default=1.0)
        attempts.append({"seed": seed, "lowest_train_balanced_accuracy": round(fit, 4), "kept": False})
        tried.append((fit, model, metrics))
        if quick or fit >= STUCK_BALANCED_ACCURACY:
            attempts[-1]["kept"] = True
            return model, metrics, attempts
        log(f"training seed {seed} stayed near chance on its own training runs (balanced accuracy {fit:.3f} "
            f"< {STUCK_BALANCED_ACCURACY} on a family): a training that never took off")
    best = max(range(len(tried)), key=lambda i: tried[i][0])
    attempts[best]["kept"] = True
    log(f"WARNING: every training seed {list(TRAINING_SEEDS)} stayed near chance; keeping seed "
        f"{attempts[best]['seed']} ({tried[best][0]:.3f}). This predictor has learned next to nothing: "
        "check the labels and the learning rate.")
    return tried[best][1], tried[best][2], attempts


def git_commit() -> str:
    """HEAD, with "+dirty" when the working tree has uncommitted changes (the code that ran is then
    HEAD plus those changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return (head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_pipeline(zoo_dir: Path, out: Path, quick: bool, source: LabelSource, train_families: Sequence[str],
                 epochs: Optional[int] = None, log=print, recorded_only: bool = False, gain: float = INPUT_GAIN,
                 lr: float = LEARNING_RATE, permute: bool = False, unseen_dir: Optional[Path] = None,
                 specs: Optional[Sequence[RunSpec]] = None) -> Dict:
    """Collect (unless ``recorded_only``), label with ``source``, train on ``train_families``,
    score and save to ``out`` with its provenance. ``specs``: the zoo (default ``zoo_specs``)."""
    t0 = time.perf_counter()
    specs = list(zoo_specs(quick) if specs is None else specs)
    if recorded_only:  # train on the zoo runs already recorded, record nothing new
        paths = [zoo_dir / f"{s.name}.pt" for s in specs if (zoo_dir / f"{s.name}.pt").exists()]
    else:
        paths = collect(zoo_dir, specs, log=log)
    t_collect = time.perf_counter() - t0
    skipped: List[str] = []
    runs = load_runs(paths, source, skipped=skipped)
    train_runs = [r for r in runs if r.family in train_families]
    held_out = [r for r in runs if r.family not in train_families]
    if not train_runs:
        raise ValueError(f"no recorded runs of the training families {list(train_families)}")
    if epochs is None:
        epochs = 2 if quick else max(10, math.ceil(TRAIN_STEPS / len(train_runs)))
    log(f"{len(train_runs)} training runs ({', '.join(train_families)}), {len(held_out)} held-out runs, "
        f"{epochs} epochs")
    t1 = time.perf_counter()
    model, train_metrics, attempts = _train_until_it_learns(train_runs, quick, log, epochs=epochs, gain=gain, lr=lr,
                                                            permute=permute)
    t_train = time.perf_counter() - t1
    metrics = {"train": train_metrics,
               "held_out": offline_metrics(model, held_out, gain=gain) if held_out else {}}
    if unseen_dir is not None:  # what leave-one-family-out predicts for an architecture never seen
        metrics["unseen_family"] = unseen_family_metrics(unseen_dir)
    thresholds = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)
    provenance = {
        "data": {"runs": [r.name for r in runs], "skipped_runs": skipped, "train_families": list(train_families),
                 "held_out_families": sorted({r.family for r in held_out}),
                 "sources": "scikit-learn bundled digits (smartfrz_fast.data, deterministic distortions); "
                            "Python standard-library sources (LM)"},
        "label_source": source.kind,
        "label_rule": source.describe(),
        "label_threshold": None if source.kind == "trials" else source.threshold,
        "label_tolerance": None if source.kind == "cka" else {"metric": source.tolerance.metric,
                                                              "value": source.tolerance.value},
        "label_sensitivity_mean_freeze_point": {f: {str(k): v for k, v in d.items()}
                                                for f, d in label_summary(runs, thresholds).items()},
        "snapshots_per_run": "total_steps // 120 steps between snapshots (SmartFRZ.sample_every_for)",
        "training": {"epochs": epochs, "optimizer": f"AdamW lr {lr:g} one-cycle, gradient norm clipped to 1, balanced classes",
                     "seed": next(a["seed"] for a in attempts if a["kept"]), "attempts": attempts,
                     "augmentation": ("per-unit permutation of the K positions, " if permute else "") + "sign flip"},
        "input_gain": gain,
        "sort_by_newest": SORT_BY_NEWEST,
        "history_sampling": SAMPLING,
        "commit": git_commit(),
        "torch": str(torch.__version__),
        "quick": quick,
        "metrics": metrics,
        "seconds": {"collect": round(t_collect, 1), "train": round(t_train, 1)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(model, out, provenance)
    log(json.dumps(metrics, indent=1))
    log(f"saved {out} (collect {t_collect:.0f} s, train {t_train:.0f} s)")
    return provenance


def unseen_family_metrics(unseen_dir: Path) -> Dict[str, Dict]:
    """Each ``without-<family>.pt``'s metrics on the family it was not trained on."""
    out = {}
    for path in sorted(Path(unseen_dir).glob("without-*.pt")):
        family = path.stem[len("without-"):]
        out[family] = load_predictor(path).provenance["metrics"]["held_out"].get(family, {})
    if not out:
        raise FileNotFoundError(f"no without-<family>.pt files in {unseen_dir}; run --leave-one-out {unseen_dir} first")
    return out


def leave_one_out(zoo_dir: Path, out_dir: Path, families: Sequence[str], source: LabelSource,
                  epochs: Optional[int], log=print, quick: bool = False, all_families: Sequence[str] = FAMILIES,
                  **kwargs) -> Dict[str, Dict]:
    """One predictor per family in ``families``, trained on all the other families' recorded runs
    and saved as ``out_dir/without-<family>.pt``; returns each one's metrics on its left-out family."""
    held_out: Dict[str, Dict] = {}
    for family in families:
        others = [f for f in all_families if f != family]
        log(f"--- leaving out {family}")
        provenance = run_pipeline(zoo_dir, out_dir / f"without-{family}.pt", quick, source, others, epochs,
                                  log=log, recorded_only=True, **kwargs)
        held_out[family] = provenance["metrics"]["held_out"].get(family, {})
    return held_out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartfrz_fast.lab.train",
                                description="Collect the zoo, label (CKA or freezing trials), train and save the SmartFRZ predictor.")
    p.add_argument("--quick", action="store_true", help="tiny zoo and training (seconds), into a temp dir")
    p.add_argument("--zoo", type=Path, default=None, help="recorded runs (default /tmp/smartfrz_zoo)")
    p.add_argument("--out", type=Path, default=None, help=f"weights file (default {DEFAULT_WEIGHTS})")
    p.add_argument("--labels", choices=LABEL_SOURCES, default="cka",
                   help="label source: CKA convergence, or freezing trials (needs --trials)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="CKA label threshold")
    p.add_argument("--trials", type=Path, default=None, metavar="DIR",
                   help="trial results (<run>.jsonl, from `python -m smartfrz_fast.lab.trials`) for --labels trials")
    p.add_argument("--tolerance", type=float, default=Tolerance().value,
                   help="trial labels: accuracy points (or relative loss with --trial-metric loss) a branch may lose")
    p.add_argument("--trial-metric", choices=("accuracy", "loss"), default="accuracy")
    p.add_argument("--train-families", default=",".join(TRAIN_FAMILIES))
    p.add_argument("--leave-one-out", type=Path, default=None, metavar="DIR",
                   help="instead: for each of --train-families, train on the other families and save "
                        "DIR/without-<family>.pt (recorded runs only)")
    p.add_argument("--unseen-dir", type=Path, default=None, metavar="DIR",
                   help="a --leave-one-out DIR whose held-out metrics go into the provenance")
    p.add_argument("--epochs", type=int, default=None, help=f"default: {TRAIN_STEPS} steps / training runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gain", type=float, default=INPUT_GAIN, help="input deviation gain")
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    p.add_argument("--permute", action="store_true", help="augment by permuting the K positions")
    p.add_argument("--recorded-only", action="store_true", help="use only runs already in --zoo")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        source = LabelSource(args.labels, args.threshold, args.trials, Tolerance(args.trial_metric, args.tolerance))
    except ValueError as exc:
        p.error(str(exc))
    families = [f for f in args.train_families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    if args.leave_one_out is not None:
        zoo = args.zoo or Path("/tmp/smartfrz_zoo")
        held_out = leave_one_out(zoo, args.leave_one_out, families, source, args.epochs, log=log,
                                 quick=args.quick, gain=args.gain, lr=args.lr, permute=args.permute)
        log("| left-out family | balanced acc. | units frozen before label | replayed FLOPs saved | label oracle |")
        log("|---|---|---|---|---|")
        for family, m in held_out.items():
            log(f"| {family} | {m.get('balanced_accuracy')} | {m.get('units_frozen_before_label')} | "
                f"{m.get('replayed_flops_saved_of_units')} | {m.get('label_oracle_flops_saved_of_units')} |")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="smartfrz_quick_")) if args.quick else None
    zoo = args.zoo or (tmp / "zoo" if args.quick else Path("/tmp/smartfrz_zoo"))
    out = args.out or (tmp / "predictor.pt" if args.quick else DEFAULT_WEIGHTS)
    run_pipeline(zoo, out, args.quick, source, families, args.epochs, log=log,
                 recorded_only=args.recorded_only, gain=args.gain, lr=args.lr, permute=args.permute,
                 unseen_dir=args.unseen_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
