"""``python -m smartfrz_fast.info``: versions, what was compiled, and which backend runs each op."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import List


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> List[str]:
    import torch

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
    return lines


def main() -> None:
    print("\n".join(collect()))


if __name__ == "__main__":
    main()
