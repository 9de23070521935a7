"""What a benchmark row records about the code it ran: the one place the benchmarks get it."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The short commit, with "+dirty" when the library, kernels or benchmarks differ from it
    (rows timed on uncommitted code must say so); "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "smartfrz_fast", "csrc", "bench"],
                               cwd=ROOT).returncode != 0
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"
