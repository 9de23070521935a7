"""pytest-benchmark suite: the history ops on the CPU path, naive baseline beside the op.

    python -m pytest bench/test_bench_ops_cpu.py --benchmark-min-rounds=5 --benchmark-max-time=1 \\
        --benchmark-json=/tmp/ops_cpu.json
    python bench/test_bench_ops_cpu.py /tmp/ops_cpu.json   # -> bench/results/ops_cpu_benchmark.md

Model-shaped weight histories from bench_history_ops.py (its shapes, WeightHistory and naive
gathers, imported, not copied); T=30, K=1024. Models: resnet50 and decoder_1b by default,
BENCH_MODELS=resnet50,vit_b16,bert_base,decoder_1b for more. One torch thread (BENCH_THREADS=n for
more: on a shared 2-core machine two threads wait on each other). One group per op and model:

- gather_history: the Python loop over units (baseline), the flat-cat gather, the reference op,
  the C++ extension (csrc/gather_history.cpp). Each timed result must equal the reference's bitwise.
- predict, the shipped predictor (weights and input transform: sort_by_newest, gain 30): the
  transform in eager ops then the reference (baseline: what SmartFRZ.decide did before the op took
  the transform), the op as SmartFRZ.decide calls it (on the CPU: the reference, transform
  inside), and the op without the transform (what the transform costs). Each timed result must
  match the reference's probabilities (fp32 tolerance) and decision.

Not under tests/: `python -m pytest tests` does not collect it. Each row's extra_info holds the
load average at its start, the torch version and threads, and the git commit.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (in the `test` extra)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_history_ops as bho  # noqa: E402

from smartfrz_fast import ops  # noqa: E402
from smartfrz_fast.ops import reference  # noqa: E402
from smartfrz_fast.ops._extension import extension_status  # noqa: E402
from smartfrz_fast.predictor import load_predictor  # noqa: E402

# one thread by default: on a shared 2-core machine two threads wait on each other and crawl
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
MODELS = [m for m in os.environ.get("BENCH_MODELS", "resnet50,decoder_1b").split(",") if m]
K, WINDOW = 1024, 30
RESULTS = Path(__file__).resolve().parent / "results" / "ops_cpu_benchmark.md"
PREDICT_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, the predict tests' tolerance
TIE = 1e-5  # decisions compared only where no probability lies this close to the threshold

unknown = [m for m in MODELS if m not in bho.MODELS]
if unknown:
    raise ValueError(f"BENCH_MODELS names unknown model(s) {unknown}; choose from {list(bho.MODELS)}")


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def commit():
    return bho.git_commit()


@pytest.fixture
def stamp(benchmark, commit):
    """Record what the row was measured under (the machine is shared: the load matters)."""
    benchmark.extra_info.update(load_avg_1min=round(os.getloadavg()[0], 2), torch=torch.__version__,
                                threads=torch.get_num_threads(), commit=commit)


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    """A model-shaped WeightHistory and the reference's snapshot of its current slot."""
    h = bho.make_history(request.param, torch.device("cpu"), K, WINDOW)
    slot = int(h.cursor) % WINDOW
    expected = h.history.clone()
    reference.gather_history_ref(h.sources, h.source_ids, h.offsets, h.rows, h.cursor, expected)
    return request.param, h, slot, expected


def bits(t: torch.Tensor) -> torch.Tensor:
    # bitwise: torch.empty parameters may hold NaN patterns, which must be copied as they are
    return t.contiguous().view(torch.int32)


def gather_impls(h):
    args = (h.sources, h.source_ids, h.offsets, h.rows, h.cursor, h.history)
    slot = int(h.cursor) % WINDOW
    loop, flat = bho.loop_gather(h), bho.flat_cat_gather(h)
    impls = {"python loop (baseline)": lambda: loop(slot), "flat-cat": lambda: flat(slot),
             "reference op": lambda: reference.gather_history_ref(*args)}
    status = extension_status()
    if status.loaded:
        impls["C++ ext"] = lambda: torch.ops.smartfrz_ext.gather_history(*args)
    return impls


GATHER_IMPLS = ["python loop (baseline)", "flat-cat", "reference op", "C++ ext"]


@pytest.mark.parametrize("impl", GATHER_IMPLS)
def test_gather_history(benchmark, stamp, case, impl):
    name, h, slot, expected = case
    impls = gather_impls(h)
    if impl not in impls:
        pytest.skip(f"smartfrz_fast._C is not built: {extension_status().reason}")
    benchmark.group = f"gather_history {name} ({len(h.units)} units, T={WINDOW}, K={K})"
    h.history.copy_(expected)
    h.history[:, slot] = float("nan")  # poison: an implementation that writes nothing fails
    benchmark(impls[impl])
    assert torch.equal(bits(h.history), bits(expected)), f"{impl} on {name}: the snapshot differs from the reference"
    benchmark.extra_info["check"] = "bitwise = reference"


@pytest.fixture(scope="module")
def shipped():
    predictor = load_predictor()
    gain = float(predictor.provenance.get("input_gain", 1.0))
    sort = bool(predictor.provenance.get("sort_by_newest", False))
    return [w.detach() for w in predictor.flat_weights()], gain, sort


PREDICT_IMPLS = ["eager transform + reference (baseline)", "op, transform inside (SmartFRZ.decide)",
                 "op, no transform"]


@pytest.mark.parametrize("impl", PREDICT_IMPLS)
def test_predict(benchmark, stamp, case, shipped, impl):
    name, h, _, _ = case
    weights, gain, sort = shipped
    # a random full window over every unit (the predictor's cost does not depend on the values)
    ring = torch.randn(h.history.shape, generator=torch.Generator().manual_seed(0))
    threshold = 0.5
    common = (h.cursor, h.rows, h.valid, weights, threshold)
    fns = {
        PREDICT_IMPLS[0]: lambda: reference.predict_ref(bho.eager_input_transform(ring, h.cursor, h.valid, gain, sort),
                                                        *common),
        PREDICT_IMPLS[1]: lambda: ops.predict(ring, *common, gain, sort),
        PREDICT_IMPLS[2]: lambda: ops.predict(ring, *common),
    }
    transform = (gain, sort) if impl != PREDICT_IMPLS[2] else (1.0, False)
    expected, _ = reference.predict_ref(ring, *common, *transform)
    benchmark.group = f"predict {name} ({h.rows.numel()} units, shipped predictor, sort={sort}, gain={gain:g})"
    prob, prefix = benchmark(fns[impl])
    torch.testing.assert_close(prob, expected, **PREDICT_TOL, msg=lambda m: f"{impl} on {name}: {m}")
    decision = "near-tie, not compared"
    if not ((expected - threshold).abs() < TIE).any():
        assert int(prefix) == int(reference.freezable_prefix(expected, threshold)), f"{impl} on {name}: decision"
        decision = "decision same"
    err = float(((prob - expected).abs() / expected.abs().clamp_min(1e-6)).max())
    benchmark.extra_info["check"] = f"max rel err {err:.1e} vs reference, {decision}"


# --------------------------------------------------------------------------------------------
# --benchmark-json -> markdown


def to_markdown(data: dict) -> str:
    """A table per group: median and IQR per implementation, and its speed-up over the baseline."""
    machine = data["machine_info"]
    cpu = machine.get("cpu", {})
    rows = data["benchmarks"]
    extra = [b["extra_info"] for b in rows]
    loads = [e["load_avg_1min"] for e in extra if "load_avg_1min" in e]
    lines = [
        "# History ops on the CPU path (pytest-benchmark)",
        "",
        "Made by `bench/test_bench_ops_cpu.py` (command in bench/README.md, CPU section). Times per call;",
        "the baseline of each group is the naive implementation; every timed result was checked",
        "against the reference inside its benchmark (bitwise for gathers, fp32 tolerance for predict).",
        "On the CPU the predict op dispatches to the reference (transform inside): its group shows",
        "what taking the transform into the op changes there, next to the eager path it replaced.",
        "Medians of few rounds on a shared machine: compare within a group, and mind the IQR.",
        "",
        f"- date: {data['datetime'][:16].replace('T', ' ')} UTC; git commit: {extra[0].get('commit', '?')}",
        f"- CPU: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores "
        f"({cpu.get('hz_actual_friendly', '?')}), "
        f"torch threads: {extra[0].get('threads', '?')}; a shared machine: 1-min load average "
        f"{min(loads, default=float('nan')):.2f} to {max(loads, default=float('nan')):.2f} over the rows",
        f"- torch {extra[0].get('torch', '?')}, Python {machine.get('python_version', '?')}, "
        f"pytest-benchmark {data.get('version', '?')}",
        "",
    ]
    groups: dict = {}
    for b in rows:
        groups.setdefault(b["group"], []).append(b)
    for group, benches in groups.items():
        base = next((b for b in benches if "baseline" in b["params"]["impl"]), benches[0])["stats"]["median"]
        lines += [f"## {group}", "", "| implementation | median (ms) | IQR (ms) | rounds | vs baseline | load | check |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for b in benches:
            s, e = b["stats"], b["extra_info"]
            lines.append(f"| {b['params']['impl']} | {s['median'] * 1e3:.3f} | {s['iqr'] * 1e3:.3f} | {s['rounds']} | "
                         f"{base / s['median']:.1f}x | {e.get('load_avg_1min', float('nan')):.2f} | {e.get('check', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: python {sys.argv[0]} BENCHMARK.json [OUT.md] (default {RESULTS})")
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else RESULTS
    out.write_text(to_markdown(json.loads(Path(sys.argv[1]).read_text())))
    print(f"wrote {out} ({datetime.datetime.now():%Y-%m-%d %H:%M})")
