"""``python -m smartfrz_fast.info``: versions, what was compiled, and which backend runs each op.

``python -m smartfrz_fast.info --check`` also runs each op once on this machine's GPU (or, with
none, on the CPU backends) against its PyTorch reference, and prints pass/fail with the backend
that ran: the first thing to run on a new GPU. A kernel that cannot compile or launch there
shows as a fallback (the op still passes: it ran its next backend). Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> List[str]:
    import smartfrz_fast
    from smartfrz_fast import ops
    from smartfrz_fast.ops._extension import extension_status
    from smartfrz_fast.predictor import DEFAULT_WEIGHTS

    status = extension_status()
    cuda = torch.cuda.is_available()
    lines = [
        f"smartfrz_fast   {smartfrz_fast.__version__}",
        f"python          {platform.python_version()} ({sys.executable})",
        f"torch           {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton          {_version('triton')}",
        f"numpy           {_version('numpy')}",
        f"GPU             {torch.cuda.get_device_name() if cuda else 'none visible'}",
        f"extension       {'loaded' if status.loaded else 'not loaded: ' + status.reason}",
    ]
    if status.build_info:
        info = status.build_info
        lines.append(f"  built with    torch {info.get('torch_version')}, {info.get('compiler')}, "
                     f"CUDA kernels: {'yes (' + str(info.get('cuda_version')) + ')' if info.get('cuda') else 'no'}")
        lines.append(f"  ops           {', '.join(info.get('ops', []))}")
    lines.append(f"predictor       {DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.exists() else 'no trained weights shipped yet'}")
    lines.append("op backends (device: backend)")
    for op, per_device in ops.backends().items():
        for device, backend in per_device.items():
            lines.append(f"  {op:<16}{device:<6}{backend}")
    taken = ops.fallbacks()
    lines.append("fallbacks       " + ("none in this process (`--check` runs each op on this GPU)" if not taken else ""))
    for (op, device), (backend, why) in taken.items():
        lines.append(f"  {op:<16}{device:<8}{backend}, because: {why}")
    return lines


# --------------------------------------------------------------------------------------------
# --check: each op once, against its reference


def _case_gather(device, g):
    from smartfrz_fast.ops import reference

    sources = [torch.randn(37, 29, generator=g).t(), torch.randn(301, generator=g).half(),
               torch.randn(40, 50, generator=g).bfloat16()[::3], torch.randn(64, generator=g).double()]
    sources = [s.to(device) for s in sources]
    units, window, k = 5, 7, 1024
    ids = torch.randint(0, len(sources), (units, k), generator=g, dtype=torch.int32)
    spans = [reference._strided_span(s).numel() for s in sources]
    offsets = torch.stack([torch.randint(0, spans[i], (), generator=g) for i in ids.view(-1).tolist()]).view(units, k)
    ids[2, 600:] = -1  # a unit with fewer than K weights
    rows, cursor = torch.tensor([4, 0, 2, 3]), torch.tensor(11)
    history = torch.full((units, window, k), float("nan"))
    args = [sources, ids, offsets, rows, cursor, history]
    expected = history.clone()
    reference.gather_history_ref([s.cpu() for s in sources], ids, offsets, rows, cursor, expected)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    return args, lambda result: _same_bits(args[5], expected)


def _same_bits(got, expected) -> Tuple[bool, str]:
    """Bit for bit, except that a NaN need only be a NaN (its payload differs between torch paths)."""
    got, expected = got.cpu(), expected.cpu()
    nan = expected.float().isnan()
    ok = torch.equal(got.float().isnan(), nan) and torch.equal(_bits(got)[~nan], _bits(expected)[~nan])
    return ok, "bit for bit" if ok else f"{int((_bits(got) != _bits(expected)).sum())} elements differ"


def _bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _case_predict(device, g):
    """The shipped predictor (K=1024, T=30) with the input transform it was trained with."""
    from smartfrz_fast.ops import reference
    from smartfrz_fast.predictor import load_predictor

    predictor = load_predictor(None)
    gain = float(predictor.provenance.get("input_gain", 1.0))
    sort = bool(predictor.provenance.get("sort_by_newest", False))
    config = predictor.config
    units = 6
    weights = [w.detach() for w in predictor.flat_weights()]
    history = torch.randn(units, config.window, config.sample_size, generator=g) * torch.rand(units, 1, 1, generator=g)
    valid = torch.tensor([config.sample_size, 300, config.sample_size, 17, config.sample_size, 1000])
    rows, cursor, threshold = torch.tensor([1, 0, 3, 2, 5]), torch.tensor(41), 0.5
    expected, _ = reference.predict_ref(history, cursor, rows, valid, weights, threshold, gain, sort)
    args = [history, cursor, rows, valid, weights, threshold, gain, sort]
    args = [[w.to(device) for w in a] if isinstance(a, list) else a.to(device) if isinstance(a, torch.Tensor) else a
            for a in args]

    def verdict(result):
        prob, prefix = result
        prob = prob.cpu()
        if not torch.allclose(prob, expected, rtol=1e-5, atol=1e-6):
            return False, f"probabilities differ by up to {float((prob - expected).abs().max()):.2e}"
        near_tie = bool(((expected - threshold).abs() < 1e-5).any())
        if not near_tie and int(prefix) != int(reference.freezable_prefix(expected, threshold)):
            return False, f"decision {int(prefix)} != the reference's"
        return True, f"probabilities within 1e-5, decision {int(prefix)} (gain {gain:g}, sorted {sort})"
    return args, verdict


def _case_cache(device, g, op_name):
    from smartfrz_fast.ops import reference

    width = 1029
    values = (torch.randn(9, width, generator=g) * 10.0 ** torch.empty(9, 1).uniform_(-20, 3, generator=g))
    values = values.to(torch.bfloat16)
    slots = torch.randperm(23, generator=g)[:9]
    data, scales = torch.full((23, width), float("nan")).to(torch.float8_e4m3fn), torch.full((23,), -7.0)
    expected, expected_scales = data.clone(), scales.clone()
    reference.cache_store_ref(values, slots, expected, expected_scales)
    if op_name == "cache_store":
        args = [t.to(device) for t in (values, slots, data, scales)]

        def verdict(result):
            ok, how = _same_bits(args[2], expected)
            ok_scales, _ = _same_bits(args[3], expected_scales)
            return ok and ok_scales, f"fp8 rows and scales {how}" if ok and ok_scales else how
        return args, verdict
    read = torch.randint(0, 9, (13,), generator=g)
    args = [expected.to(device), expected_scales.to(device), slots[read].to(device), torch.bfloat16]
    loaded = reference.cache_load_ref(expected, expected_scales, slots[read], torch.bfloat16)
    return args, lambda result: _same_bits(result, loaded)


CASES: Dict[str, Callable] = {
    "gather_history": _case_gather,
    "predict": _case_predict,
    "cache_store": lambda device, g: _case_cache(device, g, "cache_store"),
    "cache_load": lambda device, g: _case_cache(device, g, "cache_load"),
}


def _implementations(device: torch.device) -> List[Tuple[str, Dict[str, Callable]]]:
    """(label, {op: callable}) to check on ``device``: the registered ops; on the CPU with
    TRITON_INTERPRET=1 also the Triton kernels, in Triton's interpreter."""
    from smartfrz_fast import ops
    from smartfrz_fast.ops._extension import triton_interpret

    runs = [("", dict(ops.OPS))]
    if device.type == "cpu" and triton_interpret() and importlib.util.find_spec("triton") is not None:
        runs.append(("Triton in the interpreter", ops._triton_impls()))
    return runs


def check(device: Optional[str] = None, seed: Optional[int] = None) -> Tuple[List[str], bool]:
    """Each op once on ``device`` (default: the GPU, else the CPU) against its reference:
    report lines and whether every op passed."""
    import warnings

    from smartfrz_fast import ops

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:  # "bogus": torch's own parse error
        raise ValueError(f"--device {device}: not a device ({exc}); use 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the ops run on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this torch ({torch.__version__}); "
                         "leave --device out to check the CPU backends")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    if device.type == "cpu":
        lines = ["no CUDA GPU visible: checking the CPU backends (no GPU kernel runs here)"]
    else:
        major, minor = torch.cuda.get_device_capability(device)
        lines = [f"each op once on {device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor}), "
                 "against its PyTorch reference"]
    lines.append(f"seed {seed}")
    all_ok = True
    for label, implementations in _implementations(device):
        for op_name, make in CASES.items():
            g = torch.Generator().manual_seed(seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    args, verdict = make(device, g)
                    result = implementations[op_name](*args)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    ok, detail = verdict(result)
                except Exception as exc:  # a check reports every op, it does not stop at the first
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
            fallback = ops.fallbacks().get((op_name, str(device)))
            backend = label or ops.backends((device.type,))[op_name][device.type]
            if fallback is not None:
                backend = f"{fallback[0]}, FALLBACK from {backend}: {fallback[1]}"
            elif "Triton" in backend and ops.triton_import_error() is not None:
                backend = (f"its fallback (the CUDA C++ extension or the PyTorch reference), FALLBACK from {backend}: "
                           f"Triton failed to import ({ops.triton_import_error()})")
            all_ok &= ok
            lines.append(f"  {op_name:<16}{'pass' if ok else 'FAIL':<6}{backend}: {detail}")
            lines += [f"    warning: {w.message}" for w in caught if fallback is None and "smartfrz_fast" in str(w.message)]
    lines.append("all ops pass" if all_ok else "SOME OPS FAILED: please report these lines with the ones above")
    return lines, all_ok


def main(argv: Optional[List[str]] = None, prog: str = "python -m smartfrz_fast.info") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="run each op once on the GPU (or the CPU backends) against its reference")
    parser.add_argument("--device", default=None, help="device for --check (default: cuda if visible, else cpu)")
    parser.add_argument("--seed", type=int, default=None, help="inputs' seed for --check (default: a new one)")
    args = parser.parse_args(argv)
    ok = True
    if args.check:
        try:
            lines, ok = check(args.device, args.seed)
        except ValueError as exc:  # a device this machine cannot check on
            parser.error(str(exc))
    print("\n".join(collect()))
    if args.check:
        print("check")
        print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
