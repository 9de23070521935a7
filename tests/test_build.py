"""Build-system tests: the plain-CMake build of smartfrz_fast._C, and a light `import smartfrz_fast`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.slow
def test_plain_cmake_build(tmp_path):
    """CMakeLists.txt works on its own (no setup.py): configure, build, import, call."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    import torch

    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    env = dict(os.environ)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    for cmd in (configure, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    modules = sorted(build.glob("_C*.so")) + sorted(build.glob("_C*.pyd"))
    assert len(modules) == 1, f"expected one _C module in {build}: {list(build.iterdir())}"
    check = _run_python(f"""
        import importlib.util, sys
        import torch  # first: the module links against libtorch
        spec = importlib.util.spec_from_file_location("smartfrz_fast._C", {str(modules[0])!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        info = module.build_info()
        assert set(info) == {{"torch_version", "cuda", "cuda_version", "compiler", "ops"}}, info
        assert info["torch_version"] == torch.__version__, (info, torch.__version__)
        assert info["cuda"] is False and info["cuda_version"] == "", info  # CUDA is OFF by default
        assert isinstance(info["compiler"], str) and info["compiler"], info
        assert "smartfrz_ext::gather_history" in info["ops"], info
        op = torch.ops.smartfrz_ext.gather_history
        history = torch.full((2, 3, 2), float("nan"))
        source = torch.arange(6, dtype=torch.float16).view(2, 3).t()
        op([source], torch.tensor([[0, -1], [0, 0]], dtype=torch.int32),
           torch.tensor([[4, 0], [1, 3]]), torch.tensor([1]), torch.tensor(4), history)
        assert history[1, 1].tolist() == [1.0, 3.0], history
        assert bool(history[0].isnan().all()) and bool(history[1, 0].isnan().all())
        print("ok", info)
    """)
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout + check.stderr


def test_import_is_light():
    """`import smartfrz_fast` imports neither triton nor the extension, and leaves CUDA alone."""
    proc = _run_python("""
        import sys
        import smartfrz_fast
        loaded = [name for name in ("triton", "smartfrz_fast._C") if name in sys.modules]
        assert not loaded, f"import smartfrz_fast imported {loaded}"
        import torch
        assert not torch.cuda.is_initialized(), "import smartfrz_fast initialised CUDA"
        print("ok")
    """, cwd=str(ROOT))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
