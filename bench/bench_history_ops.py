"""Benchmark of the history ops, side by side, on model-shaped weight histories.

    python bench/bench_history_ops.py                    # CUDA if visible, else CPU; all models
    python bench/bench_history_ops.py --device cpu --models resnet50

gather_history: a Python loop over units, a flat-cat gather, the reference op, the C++/CUDA
extension, the Triton kernel (CUDA), each eager, and replayed from a CUDA graph where that is
possible. predict, with the shipped predictor's input transform (sort_by_newest, gain 30):
the transform in eager ops then the reference predictor (what SmartFRZ.decide did before the op
took the transform; also with the host read of the decision an engine needs, and replayed from a
CUDA graph), and the fused Triton kernel with the transform applied as it loads the window,
eager and in a graph (beside it on CUDA: the eager transform feeding the kernel, and the kernel
without a transform). On CUDA it also checks that the Triton path makes no host sync
(torch.cuda.set_sync_debug_mode("error")) and that the kernels agree with the references.

Parameters are allocated with torch.empty in the shapes of real models (ResNet-50, ViT-B/16,
BERT-base, a 1.1B decoder) and sampled by the library's own WeightHistory; the predictor has
random weights (its cost does not depend on them). Rows are appended to
bench/results/history_ops.csv with device, versions, date and git commit.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import git_commit  # noqa: E402
from smartfrz_fast import ops  # noqa: E402
from smartfrz_fast.history import WeightHistory  # noqa: E402
from smartfrz_fast.ops import reference  # noqa: E402
from smartfrz_fast.ops._extension import extension_status  # noqa: E402
from smartfrz_fast.predictor import AttentionPredictor, PredictorConfig  # noqa: E402

CSV_PATH = ROOT / "bench" / "results" / "history_ops.csv"
FIELDS = ["date", "commit", "device", "load_avg_1min", "torch", "triton", "model", "units", "params_M", "T", "K", "op", "impl",
          "mode", "us_per_call", "check"]


# --------------------------------------------------------------------------------------------
# Model shapes: one list of parameter shapes per unit (norm layers merged into the layer before)


def resnet50_units():
    units = [[(64, 3, 7, 7), (64,), (64,)]]  # stem conv + bn
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            units += [[(width, inplanes if b == 0 else width * 4, 1, 1), (width,), (width,)],
                      [(width, width, 3, 3), (width,), (width,)],
                      [(width * 4, width, 1, 1), (width * 4,), (width * 4,)]]
            if b == 0:
                units.append([(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)])  # downsample
            inplanes = width * 4
    units.append([(1000, 2048), (1000,)])
    return units  # 54 units, 25.6M parameters


def vit_b16_units(d=768, layers=12):
    units = [[(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d), (d,), (d,)]]  # patch embed, cls, pos, ln1
    for i in range(layers):
        units += [[(3 * d, d), (3 * d,)], [(d, d), (d,), (d,), (d,)],  # qkv; proj + ln2
                  [(4 * d, d), (4 * d,)], [(d, 4 * d), (d,), (d,), (d,)]]  # fc1; fc2 + next ln1
    units.append([(1000, d), (1000,)])
    return units  # 50 units, 86.6M parameters


def bert_base_units(d=768, layers=12):
    units = [[(30522, d)], [(512, d)], [(2, d), (d,), (d,)]]  # word, position, type (+LN) embeddings
    for _ in range(layers):
        units += [[(d, d), (d,)], [(d, d), (d,)], [(d, d), (d,)], [(d, d), (d,), (d,), (d,)],
                  [(4 * d, d), (4 * d,)], [(d, 4 * d), (d,), (d,), (d,)]]
    units.append([(d, d), (d,)])  # pooler
    return units  # 76 units, 109M parameters


def decoder_1b_units(d=2048, ffn=4096, kv=256, layers=28, vocab=32000):
    units = [[(vocab, d), (d,)]]  # embedding + first RMSNorm
    for _ in range(layers):
        units += [[(d, d)], [(kv, d)], [(kv, d)], [(d, d), (d,)], [(ffn, d)], [(ffn, d)], [(d, ffn), (d,)]]
    units.append([(vocab, d)])  # untied LM head
    return units  # 198 units, 1.1B parameters


MODELS = {  # name -> (unit shapes, parameter dtype)
    "resnet50": (resnet50_units, torch.float32),
    "vit_b16": (vit_b16_units, torch.float32),
    "bert_base": (bert_base_units, torch.float32),
    "decoder_1b": (decoder_1b_units, torch.bfloat16),
}


def make_history(name: str, device: torch.device, k: int, window: int):
    shapes, dtype = MODELS[name]
    units = []
    for i, unit_shapes in enumerate(shapes()):
        # torch.empty: values do not matter to the gather's cost, and untouched pages cost no memory
        params = [torch.empty(s, dtype=dtype, device=device) for s in unit_shapes]
        units.append(types.SimpleNamespace(index=i, name=f"unit{i}", parameters=params,
                                           param_names=[f"unit{i}.p{j}" for j in range(len(params))]))
    history = WeightHistory(units, sample_size=k, window=window, seed=0)
    history.history.normal_()
    return history


# --------------------------------------------------------------------------------------------
# Gather implementations


def loop_gather(history: WeightHistory):
    """What a first implementation does: per unit, flatten its parameters, index, write."""
    indices, first = [], 0
    for u, unit in enumerate(history.units):
        n = int(history.valid[u])
        starts = torch.tensor([0] + [p.numel() for p in unit.parameters]).cumsum(0)
        ids = history.source_ids[u, :n].cpu().long() - first
        # parameters here are contiguous: a storage offset is the flat index in the parameter
        indices.append((starts[ids] + history.offsets[u, :n].cpu()).to(history.device))
        first += len(unit.parameters)
    k = history.sample_size

    def run(slot: int):
        for u, unit in enumerate(history.units):
            flat = torch.cat([p.detach().reshape(-1) for p in unit.parameters])
            idx = indices[u]
            history.history[u, slot, :idx.numel()] = flat[idx].float()
            if idx.numel() < k:
                history.history[u, slot, idx.numel():] = 0
    return run


def flat_cat_gather(history: WeightHistory):
    """One cat of every parameter, one index with precomputed global positions, one copy."""
    starts, total = [], 0
    for s in history.sources:
        starts.append(total)
        total += s.numel()
    starts_t = torch.tensor(starts, device=history.device)
    ids = history.source_ids.long().clamp_min(0)
    index = (starts_t[ids] + history.offsets).reshape(-1)
    mask = history.source_ids >= 0

    def run(slot: int):
        flat = torch.cat([p.detach().reshape(-1) for p in history.sources])
        history.history[:, slot] = torch.where(mask, flat[index].view_as(mask).float(), 0.0)
    return run


def eager_input_transform(ring, cursor, valid, gain: float, sort: bool):
    """The predictor's input transform on the whole ring in eager ops (newest slot picked by the
    cursor, no host sync): what SmartFRZ.decide did before the predict op took the transform."""
    if gain == 1.0 and not sort:
        return ring
    newest = ring.index_select(1, (cursor - 1) % ring.shape[1])
    if sort:
        ring = reference.sort_by_newest(ring, newest, valid)
        newest = ring.index_select(1, (cursor - 1) % ring.shape[1])
    return reference.amplify_deviation(ring, newest, gain)


# --------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_us(fn: Callable[[], object], device, budget_s: float = 0.08, repeats: int = 5) -> float:
    """Median over repeats of the mean time per call (µs); iterations sized to the budget."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    iters = max(1, min(1000, int(budget_s / once)))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) * 1000 / iters)
        else:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - start) * 1e6 / iters)
    return statistics.median(samples)


def graph_us(fn: Callable[[], object], device, per_graph: int = 10) -> float:
    """Time per call replayed from a CUDA graph holding ``per_graph`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up (Triton compiles, pointer tables) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return time_us(graph.replay, device) / per_graph


def graph_us_or_nan(fn: Callable[[], object], device, per_graph: int = 10) -> float:
    """graph_us, or NaN (with the reason printed) where the calls cannot be captured."""
    try:
        return graph_us(fn, device, per_graph)
    except Exception as exc:  # e.g. a host sync inside: report, keep the other rows
        print(f"  (capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return float("nan")


def no_host_sync(fn: Callable[[], object]) -> str:
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no host sync"
    except RuntimeError as exc:
        return f"HOST SYNC: {str(exc).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------------------------


def bench_model(name: str, device: torch.device, k: int, window: int, triton_kernels,
                gain: float = 30.0, sort: bool = True) -> List[Dict]:
    h = make_history(name, device, k, window)
    meta = dict(model=name, units=len(h.units), params_M=round(sum(s.numel() for s in h.sources) / 1e6, 1),
                T=window, K=k)
    rows: List[Dict] = []

    def add(op, impl, mode, us, check=""):
        rows.append(dict(meta, op=op, impl=impl, mode=mode, us_per_call=round(us, 2), check=check))
        print(f"  {name:<11} {op:<15} {impl:<26} {mode:<7} {us:>12.1f} us  {check}", flush=True)

    cursor = h.cursor
    args = (h.sources, h.source_ids, h.offsets, h.rows, cursor, h.history)

    # correctness first: every implementation writes what the reference writes
    expected = h.history.clone()
    reference.gather_history_ref(h.sources, h.source_ids, h.offsets, h.rows, cursor, expected)
    slot = int(cursor) % window

    def agrees(fill) -> str:
        h.history.fill_(float("nan"))
        fill()
        # bitwise: torch.empty parameters may hold NaN patterns, which must be copied as they are
        ok = torch.equal(h.history[:, slot].view(torch.int32), expected[:, slot].view(torch.int32))
        h.history.copy_(expected)
        return "exact" if ok else "MISMATCH"

    loop = loop_gather(h)
    flat = flat_cat_gather(h)
    add("gather_history", "python loop", "eager", time_us(lambda: loop(slot), device), agrees(lambda: loop(slot)))
    add("gather_history", "flat-cat", "eager", time_us(lambda: flat(slot), device), agrees(lambda: flat(slot)))
    add("gather_history", "reference op", "eager", time_us(lambda: reference.gather_history_ref(*args), device))
    status = extension_status()
    if status.loaded and (device.type == "cpu" or status.has_cuda):
        ext = torch.ops.smartfrz_ext.gather_history
        impl = "C++ ext" if device.type == "cpu" else "CUDA C++ ext (csrc/cuda)"
        check = agrees(lambda: ext(*args))
        add("gather_history", impl, "eager", time_us(lambda: ext(*args), device), check)
        if device.type == "cuda":
            add("gather_history", impl, "graph", graph_us_or_nan(lambda: ext(*args), device), no_host_sync(lambda: ext(*args)))
    if triton_kernels is not None:
        tg = triton_kernels.gather_history
        check = agrees(lambda: tg(*args))
        add("gather_history", "triton", "eager", time_us(lambda: tg(*args), device), check)
        add("gather_history", "triton", "graph", graph_us_or_nan(lambda: tg(*args), device), no_host_sync(lambda: tg(*args)))

    # predict over every unit, full windows, with the predictor's input transform (the shipped
    # predictor's: sort_by_newest and gain 30; --input-gain 1 --no-sort for none): the decision
    # SmartFRZ makes per snapshot. "eager transform" is what SmartFRZ.decide did before the op
    # took the transform: the whole ring sorted and amplified with eager ops, then the op.
    h.history.normal_()  # the gathers above wrote slots from uninitialised (torch.empty) weights
    predictor = AttentionPredictor(PredictorConfig(sample_size=k, window=window)).to(device)
    weights = [w.detach() for w in predictor.flat_weights()]
    pargs = (h.history, cursor, h.rows, h.valid, weights, 0.5)
    transformed = gain != 1.0 or sort
    tag = f" [{'sort, ' if sort else ''}gain {gain:g}]" if transformed else ""

    def eager_transform():
        return eager_input_transform(h.history, cursor, h.valid, gain, sort)

    def eager_predict():
        return reference.predict_ref(eager_transform(), *pargs[1:])

    prob_ref, prefix_ref = reference.predict_ref(*pargs, gain, sort)  # the transform inside the op
    prob_eager, prefix_eager = eager_predict()
    err = float(((prob_eager - prob_ref).abs() / prob_ref.abs().clamp_min(1e-6)).max())
    add("predict", "eager transform + reference" + tag, "eager", time_us(eager_predict, device),
        f"vs op's transform: max rel err {err:.1e}, decision {'same' if int(prefix_eager) == int(prefix_ref) else 'DIFFERS'}")
    if device.type == "cpu":  # the op's CPU path (ops/cpu_predict.py), beside the reference it computes
        from smartfrz_fast.ops.cpu_predict import predict_cpu

        prob_cpu, prefix_cpu = predict_cpu(*pargs, gain, sort)
        err = float(((prob_cpu - prob_ref).abs() / prob_ref.abs().clamp_min(1e-6)).max())
        add("predict", "reference (the op's transform)" + tag, "eager",
            time_us(lambda: reference.predict_ref(*pargs, gain, sort), device))
        add("predict", "cpu fused passes" + tag, "eager", time_us(lambda: predict_cpu(*pargs, gain, sort), device),
            f"max rel err {err:.1e}, decision {'same' if int(prefix_cpu) == int(prefix_ref) else 'DIFFERS'}")
    if device.type == "cuda":
        add("predict", "eager transform + reference + read decision" + tag, "eager",
            time_us(lambda: int(eager_predict()[1]), device))
        add("predict", "eager transform + reference" + tag, "graph", graph_us_or_nan(eager_predict, device, 1))
    if triton_kernels is not None:
        out = (torch.empty_like(prob_ref), torch.empty_like(prefix_ref))
        tp = triton_kernels.predict

        def fused(precision="ieee"):
            return tp(*pargs, gain, sort, out=out, precision=precision)

        fused()
        err = float(((out[0] - prob_ref).abs() / prob_ref.abs().clamp_min(1e-6)).max())
        check = f"max rel err {err:.1e}, decision {'same' if int(out[1]) == int(prefix_ref) else 'DIFFERS'}"
        add("predict", "triton fused" + tag, "eager", time_us(fused, device), check)
        add("predict", "triton fused" + tag, "graph", graph_us_or_nan(fused, device), no_host_sync(fused))
        if transformed:  # what the fusion saves, and what the transform costs inside the kernel
            add("predict", "eager transform + triton" + tag, "graph",
                graph_us_or_nan(lambda: tp(eager_transform(), *pargs[1:], out=out), device))
            add("predict", "triton fused (no transform)", "graph", graph_us_or_nan(lambda: tp(*pargs, out=out), device))
        # tensor cores (tf32): a measurement of what precision costs, not what the op runs
        fused("tf32")
        err = float(((out[0] - prob_ref).abs() / prob_ref.abs().clamp_min(1e-6)).max())
        add("predict", "triton fused tf32" + tag, "graph", graph_us_or_nan(lambda: fused("tf32"), device),
            f"max rel err {err:.1e}")
    h = None  # frees the history (closures above share it) before the next model's
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--sample-size", type=int, default=1024)
    parser.add_argument("--input-gain", type=float, default=30.0,
                        help="predict's input_gain (the shipped predictor's: 30; 1: none)")
    parser.add_argument("--no-sort", dest="sort", action="store_false",
                        help="predict without sort_by_newest (the shipped predictor sorts)")
    parser.add_argument("--csv", default=str(CSV_PATH), help="rows are appended here ('' to skip)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    triton_kernels, triton_version = None, "not installed"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda" and triton_version != "not installed":
        if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
            sys.exit("unset TRITON_INTERPRET: it would time Triton's CPU interpreter, not the GPU kernels")
        from smartfrz_fast.ops import triton_kernels  # noqa: F811
    # (on the CPU the Triton kernels only run in the interpreter: a correctness tool, not timed)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    # the load average tells whether CPU rows were taken on a busy (shared) machine
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), commit=git_commit(),
                 device=device_name, load_avg_1min=round(os.getloadavg()[0], 2), torch=torch.__version__, triton=triton_version)
    print(f"{device_name}, torch {torch.__version__}, triton {triton_version}, backends: {ops.backends()}")
    start = time.time()
    rows = []
    for name in models:
        rows += [dict(stamp, **r) for r in bench_model(name, device, args.sample_size, args.window, triton_kernels,
                                                         args.input_gain, args.sort)]
    print(f"done in {time.time() - start:.0f} s")
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
