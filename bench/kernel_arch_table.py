"""Compile every Triton kernel specialisation ahead of time for each GPU architecture users
train on, and check its shared memory and registers against that architecture's per-block
limits. No GPU needed: Triton's own compiler (triton.compile with a GPUTarget) and the ptxas
and cuobjdump it ships.

    python bench/kernel_arch_table.py                   # all targets -> bench/results/kernel_arch_limits.md
    python bench/kernel_arch_table.py --targets 86 90   # some targets
    python bench/kernel_arch_table.py --out /tmp/t.md --jobs 4

Exit status 1 if any specialisation does not fit. predict is compiled in the order the kernel
tries its launch configurations on a device (triton_kernels.PREDICT_CONFIGS), up to the first
that fits there: that is the one the device runs. Compiling takes minutes of CPU (predict
~10-15 s per configuration per target); Triton caches compiled kernels (~/.triton/cache), so a
second run takes seconds.

Per-block limits. Shared memory: the opt-in maximum per block, which is the SM's shared memory
minus 1 KiB the CUDA driver reserves per block from sm_80 on (NVIDIA CCCL, libcu++
``cuda/__device/arch_traits.h``: max_shared_memory_per_multiprocessor 64/164/100/100/228/228/100
KiB for sm_75/80/86/89/90/100/120, reserved_shared_memory_per_block 1024 from sm_80; these are
the "maximum amount of shared memory per thread block" rows of the CUDA C++ Programming Guide's
technical-specifications table, 64/163/99/99/227/227/99 KiB; the Ampere tuning guide: "The
NVIDIA A100 GPU supports shared memory capacity of 0, 8, 16, 32, 64, 100, 132 or 164 KB per SM.
GPUs with compute capability 8.6 support shared memory capacity of 0, 8, 16, 32, 64 or 100 KB
per SM"). Registers: 64 K 32-bit registers per block and 255 per thread on all of them (same
file: max_registers_per_block 64 * 1024, max_registers_per_thread 255), allocated per thread in
units of 8.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: must be unset before triton is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KIB = 1024
# compute capability -> (GPUs users train on, shared memory per block in bytes)
TARGETS = {
    75: ("T4, RTX 20xx", 64 * KIB),
    80: ("A100, A30", 163 * KIB),
    86: ("A10/A10G, A40, RTX 30xx", 99 * KIB),
    89: ("L4, L40S, RTX 40xx", 99 * KIB),
    90: ("H100, H200", 227 * KIB),
    100: ("B200, GB200", 227 * KIB),
    120: ("RTX 50xx, RTX PRO 6000", 99 * KIB),
}
REGISTERS_PER_BLOCK = 64 * KIB
REGISTERS_PER_THREAD = 255
DEFAULT_OUT = ROOT / "bench" / "results" / "kernel_arch_limits.md"

# the shipped predictor (PredictorConfig defaults) and its input transform (sorted, amplified)
PREDICT_SHAPE = dict(T=30, K=1024, H=256, E=64, HH=32, TP=32, HP=256, EP=64, HHP=32, KP=1024, PRECISION="ieee")
PREDICT_VARIANTS = {"plain": (False, False), "transform (shipped)": (True, True)}


def _signatures():
    """(kernel name, label, argument types, constexprs, options) of every specialisation but
    predict's, as the Python wrappers in triton_kernels launch them."""
    specs = []
    i32 = ["ids_su", "ids_sk", "off_su", "off_sk", "h_su", "h_st", "h_sk", "K", "T"]
    specs.append(("_gather_history_kernel", "BLOCK_K=1024",
                  [("table_ptr", "*i64"), ("dtype_ptr", "*i32"), ("num_sources", "i32"), ("ids_ptr", "*i32"),
                   ("offsets_ptr", "*i64"), ("rows_ptr", "*i64"), ("cursor_ptr", "*i64"), ("hist_ptr", "*fp32")]
                  + [(name, "i32") for name in i32], {"BLOCK_K": 1024}, {}))
    prefix = [("prob_ptr", "*fp32"), ("out_ptr", "*i64"), ("threshold", "fp32")]
    specs.append(("_prefix_kernel", "R runtime", prefix + [("R", "i32")], {"BLOCK": 256}, {}))
    specs.append(("_prefix_kernel", "R == 1", prefix, {"BLOCK": 256, "R": 1}, {}))  # Triton specialises 1
    for word in ("i64", "i32", "i16", "u8"):  # gather_rows copies rows as the widest words that fit
        specs.append(("_gather_rows_kernel", f"{word} words",
                      [("src_ptr", "*" + word), ("index_ptr", "*i64"), ("out_ptr", "*" + word),
                       ("num_rows", "i32"), ("width", "i32")], {"BLOCK": 1024}, {}))
    storage_words = {0: ("fp32", "*fp32"), 1: ("bf16", "*i16"), 2: ("fp8", "*u8")}
    for storage, (storage_name, word) in storage_words.items():
        for row in ("fp32", "bf16", "fp16"):
            specs.append(("_cache_store_kernel", f"{row} -> {storage_name}",
                          [("values_ptr", "*" + row), ("slots_ptr", "*i64"), ("data_ptr", word),
                           ("scales_ptr", "*fp32"), ("width", "i32")], {"STORAGE": storage, "BLOCK": 1024}, {}))
        for out_code, (out_name, out) in enumerate((("fp32", "*fp32"), ("bf16", "*i16"), ("fp16", "*fp16"))):
            specs.append(("_cache_load_kernel", f"{storage_name} -> {out_name}",
                          [("data_ptr", word), ("scales_ptr", "*fp32"), ("slots_ptr", "*i64"), ("out_ptr", out),
                           ("width", "i32")], {"STORAGE": storage, "OUT": out_code, "BLOCK": 1024}, {}))
    return specs


def _predict_args():
    args = [("hist_ptr", "*fp32"), ("h_su", "i32"), ("h_st", "i32"), ("h_sk", "i32"), ("cursor_ptr", "*i64"),
            ("rows_ptr", "*i64"), ("valid_ptr", "*i64"), ("prob_ptr", "*fp32"), ("perm_ptr", "*i32")]
    # mixed weight dtypes compile too: the K MLP's in bf16
    args += [(m + p, "*bf16" if m == "k" else "*fp32") for m in "qkvh" for p in ("w1", "b1", "w2", "b2", "w3", "b3")]
    return args + [("sqrt_e", "fp32"), ("eps", "fp32"), ("gain", "fp32")]


def _resources(kernel) -> dict:
    """Registers, spill stack and static shared memory per thread/block, from the cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {name: int(usage.get(name, 0)) for name in ("REG", "STACK", "SHARED", "LOCAL")}


def _compile(name, args, constexprs, options, capability) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from smartfrz_fast.ops import triton_kernels as tk

    signature = dict(args)
    signature.update({key: "constexpr" for key in constexprs})
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=getattr(tk, name), signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", capability, 32), options=options)
    seconds = time.perf_counter() - start
    res = _resources(kernel)
    threads = kernel.metadata.num_warps * 32
    shared = kernel.metadata.shared + res["SHARED"]  # Triton's dynamic + any static shared memory
    limit = TARGETS[capability][1]
    registers_block = -(-res["REG"] // 8) * 8 * threads
    fits = shared <= limit and res["REG"] <= REGISTERS_PER_THREAD and registers_block <= REGISTERS_PER_BLOCK
    return dict(shared=shared, regs=res["REG"], stack=res["STACK"], threads=threads,
                registers_block=registers_block, limit=limit, fits=fits, seconds=seconds)


def _small_kernels_job(capability):
    """Every specialisation but predict's, for one target: one row per kernel (the largest)."""
    rows = {}
    for name, label, args, constexprs, options in _signatures():
        r = _compile(name, args, constexprs, options, capability)
        row = rows.setdefault(name, dict(r, count=0, fits=True, seconds=0.0))
        row["count"] += 1
        row["fits"] &= r["fits"]
        row["seconds"] += r["seconds"]
        for key in ("shared", "regs", "stack", "registers_block"):
            row[key] = max(row[key], r[key])
    return [dict(target=capability, kernel=name, spec=f"{r['count']} specialisations (largest figures)",
                 runs=True, **{k: v for k, v in r.items() if k != "count"}) for name, r in rows.items()]


def _predict_job(capability, variant):
    """predict's configurations for one target, in the kernel's order, up to the first that fits."""
    from smartfrz_fast.ops.triton_kernels import PREDICT_CONFIGS

    sort, amplify = PREDICT_VARIANTS[variant]
    rows = []
    for config in PREDICT_CONFIGS:
        constexprs = dict(PREDICT_SHAPE, BK=config["block_k"], BN=config["block_n"], SORT=sort, AMPLIFY=amplify)
        options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        r = _compile("_predict_kernel", _predict_args(), constexprs, options, capability)
        spec = f"{variant}; block_k {config['block_k']}, block_n {config['block_n']}, stages {config['num_stages']}"
        rows.append(dict(target=capability, kernel="_predict_kernel", spec=spec, runs=r["fits"], **r))
        if r["fits"]:
            break
    return rows


def build_table(targets, jobs: int):
    work = [(_predict_job, (t, v)) for t in targets for v in PREDICT_VARIANTS] + [(_small_kernels_job, (t,)) for t in targets]
    rows = []
    if jobs <= 1:
        for fn, args in work:
            rows += fn(*args)
    else:
        with cf.ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(fn, *args) for fn, args in work]
            for future in futures:
                rows += future.result()
    order = {name: i for i, name in enumerate(["_predict_kernel", "_gather_history_kernel", "_prefix_kernel",
                                               "_gather_rows_kernel", "_cache_store_kernel", "_cache_load_kernel"])}
    rows.sort(key=lambda r: (r["target"], order[r["kernel"]]))
    return rows


def problems(rows):
    """What does not fit: a non-predict specialisation over a limit, or a (target, predict
    variant) where no configuration fits."""
    bad = [f"sm_{r['target']} {r['kernel']} {r['spec']}" for r in rows if r["kernel"] != "_predict_kernel" and not r["fits"]]
    for target in sorted({r["target"] for r in rows}):
        for variant in PREDICT_VARIANTS:
            tried = [r for r in rows if r["target"] == target and r["kernel"] == "_predict_kernel"
                     and r["spec"].startswith(variant)]
            if tried and not any(r["fits"] for r in tried):
                bad.append(f"sm_{target} _predict_kernel {variant}: no configuration fits")
    return bad


def source_commit() -> str:
    """The commit the kernels are compiled from, marked when the kernel sources differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "smartfrz_fast/ops", "bench/kernel_arch_table.py")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes" if dirty else "")


def markdown(rows, seconds: float, jobs: int, commit: str) -> str:
    import triton

    lines = [
        "# Triton kernels: shared memory and registers per architecture (compiled ahead of time)",
        "",
        f"`python bench/kernel_arch_table.py` — triton {triton.__version__}, "
        f"{datetime.date.today().isoformat()}, commit {commit}, {seconds:.0f} s wall with {jobs} job(s) "
        "on a CPU machine (no GPU; compile cache as found).",
        "",
        "Compiled for these targets; **none of them has run on a GPU of that architecture yet**. "
        "Shared = Triton's dynamic shared memory plus any static (cubin); limit = the per-block "
        "opt-in maximum (sources in the script's docstring). Registers per thread from the cubin "
        "(cuobjdump); a block needs registers x threads (units of 8) <= 65,536 and at most 255 per "
        "thread. Stack = per-thread local memory (register spills). predict (the shipped predictor, "
        "K=1024, T=30, 256/64/32) is listed in the order its launch configurations are tried; "
        "'runs' marks the one that device runs. Other kernels: the largest figures over their "
        "specialisations (dtypes, storage formats, word widths).",
        "",
        "| target | GPUs | kernel | specialisation | shared B | limit B | regs/thread | regs/block | stack B | fits | runs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| sm_{r['target']} | {TARGETS[r['target']][0]} | {r['kernel']} | {r['spec']} | {r['shared']:,} | "
                     f"{r['limit']:,} | {r['regs']} | {r['registers_block']:,} | {r['stack']} | "
                     f"{'yes' if r['fits'] else '**no**'} | {'yes' if r['runs'] else 'no: next configuration'} |")
    bad = problems(rows)
    lines += ["", "Everything fits." if not bad else "**Does not fit:** " + "; ".join(bad), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), choices=list(TARGETS),
                        help="compute capabilities (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown table (default {DEFAULT_OUT})")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    commit = source_commit()  # before compiling: the workers read the sources as they are now
    start = time.perf_counter()
    rows = build_table(args.targets, args.jobs)
    seconds = time.perf_counter() - start
    text = markdown(rows, seconds, args.jobs, commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 1 if problems(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
