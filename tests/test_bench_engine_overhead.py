"""bench/bench_engine_overhead.py runs on a shallow model and writes its table."""

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # its provenance import
spec = importlib.util.spec_from_file_location("bench_engine_overhead", BENCH / "bench_engine_overhead.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "overhead.md"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--layers", "12", "--repeats", "2", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 12 |")]
    assert len(rows) == 1 and rows[0].count("|") == 10
