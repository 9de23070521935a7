"""A figure of a training run with freezing: the freeze timeline, step time and accuracy.

Needs matplotlib (``pip install matplotlib``, the ``plot`` extra). Drawn with matplotlib's Agg canvas
directly (no pyplot): headless, and the caller's matplotlib backend is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

from .engine import FreezeEvent

_MISSING = "plotting needs matplotlib, which is not installed: `pip install matplotlib`"


def require_matplotlib() -> None:
    """Raise ImportError with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING) from exc


@dataclass
class Curve:
    """One training run: its per-step wall time and its accuracy at some steps."""

    label: str
    step_ms: Sequence[float]  # step i + 1 took step_ms[i]
    accuracy: Sequence[Tuple[int, float]] = field(default_factory=list)  # (step, accuracy in [0, 1])


def _rolling_median(values: Sequence[float], width: int) -> List[float]:
    out = []
    for i in range(len(values)):
        window = sorted(values[max(0, i - width + 1): i + 1])
        out.append(window[len(window) // 2])
    return out


def plot_format(path: str) -> str:
    """The image format ``path``'s extension names (png without one); a clear error for an
    extension matplotlib cannot write, before any training is spent."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    suffix = Path(path).suffix.lstrip(".").lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise ValueError(f"cannot write a plot to {path!r}: matplotlib writes {', '.join(sorted(supported))}; "
                         "end the path in one of them (.png, .pdf, .svg)")
    return suffix or "png"


def plot_training(path: str, curves: Sequence[Curve], timeline: Sequence[FreezeEvent],
                  num_units: int, title: str = "", dpi: int = 110) -> str:
    """Write a three-panel figure to ``path`` (PNG, or the format its extension names: .pdf, .svg): frozen units (with the units each freeze added),
    step time (per step, faint, and a rolling median) and accuracy, against the step.
    ``timeline``: the freezer's events; ``num_units``: its unit count. Returns ``path``."""
    fmt = plot_format(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_training needs at least one Curve")
    total = max(len(c.step_ms) for c in curves)
    fig = Figure(figsize=(10, 8.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_frz, ax_time, ax_acc = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1.1, 1, 1]})
    colors = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"]

    # 1. frozen prefix length; a freeze after step s applies from step s + 1
    xs, ys, level = [0], [0], 0
    for e in timeline:
        xs += [e.step, e.step]
        ys += [level, e.num_frozen]
        level = e.num_frozen
    xs.append(total)
    ys.append(level)
    ax_frz.plot(xs, ys, color="#1f77b4", lw=2, drawstyle="default")
    ax_frz.fill_between(xs, ys, color="#1f77b4", alpha=0.15)
    for e in timeline:
        names = ", ".join(e.unit_names)
        label = names if len(names) <= 28 else names[:26] + ".."
        ax_frz.annotate(f"{label}  ({e.frozen_flops_fraction:.0%} FLOPs)", (e.step, e.num_frozen),
                        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=7.5)
    ax_frz.set_ylim(0, max(num_units, 1) + 0.5)
    ax_frz.set_ylabel("frozen units")
    ax_frz.set_title("freeze timeline (units newly frozen; share of a step's training FLOPs skipped)", fontsize=9)
    ax_frz.grid(alpha=0.3)

    # 2. step time
    width = max(5, total // 40)
    for i, c in enumerate(curves):
        steps = list(range(1, len(c.step_ms) + 1))
        color = colors[i % len(colors)]
        ax_time.plot(steps, c.step_ms, color=color, alpha=0.18, lw=0.8)
        ax_time.plot(steps, _rolling_median(c.step_ms, width), color=color, lw=1.8,
                     label=f"{c.label} (rolling median of {width})")
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_ylim(bottom=0)
    ax_time.legend(fontsize=8, loc="lower left")
    ax_time.grid(alpha=0.3)

    # 3. accuracy
    for i, c in enumerate(curves):
        if c.accuracy:
            s, a = zip(*c.accuracy)
            ax_acc.plot(s, [100 * v for v in a], marker="o", ms=3, color=colors[i % len(colors)], label=c.label)
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_xlabel("optimizer step")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.grid(alpha=0.3)
    for e in timeline:
        for ax in (ax_time, ax_acc):
            ax.axvline(e.step, color="#1f77b4", lw=0.6, ls=":", alpha=0.7)
    ax_acc.set_xlim(0, total)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    return path
