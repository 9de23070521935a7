"""Build and install smartfrz_fast; the optional extension smartfrz_fast._C is built by CMake.

Install torch first, then (no build isolation, so the build sees that torch):

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

CMakeLists.txt is the one build definition of the extension; the build_ext below only
configures and runs it. Environment:

    SMARTFRZ_BUILD_CUDA=auto|0|1  auto (default): build the CUDA kernels if torch is a CUDA build,
                                  a CUDA toolkit is found and a GPU is visible or
                                  TORCH_CUDA_ARCH_LIST is set; 1: require them; 0: never.
    SMARTFRZ_REQUIRE_EXT=1        fail the install if the extension cannot be built (default: warn
                                  and install the pure-PyTorch package without it).
    SMARTFRZ_CMAKE_ARGS="..."     extra arguments for the CMake configure step.
    SMARTFRZ_BUILD_DIR=...        where CMake builds (default ./build, kept for incremental builds).
    TORCH_CUDA_ARCH_LIST          e.g. "9.0" or "8.0;9.0" (default: the visible GPUs).
    CMAKE_BUILD_PARALLEL_LEVEL    build jobs (default: all cores).

torch is deliberately not imported at module level nor a build requirement: it is imported
inside build_ext, and if that fails (e.g. an isolated build) the package installs without
the extension.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional, Tuple

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_NAME = "smartfrz_fast._C"
FALLBACK_VERSION = "0.1.0"


def read_version() -> str:
    init = ROOT / "smartfrz_fast" / "__init__.py"
    text = init.read_text(encoding="utf-8") if init.exists() else ""
    match = re.search(r"^__version__\s*[:=][^\"']*[\"']([^\"']+)[\"']", text, re.M)
    return match.group(1) if match else FALLBACK_VERSION


class ExtensionBuildError(RuntimeError):
    """The extension could not be built (the message says why)."""


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])  # CMakeLists.txt lists the sources


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _find_cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` package from PyPI, if installed in this environment
        import cmake  # type: ignore

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.exists():
            return str(candidate)
    except Exception:
        pass
    raise ExtensionBuildError("cmake (>= 3.18) was not found on PATH; `pip install cmake` or install it "
                              "with your system's package manager")


def _find_ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the `ninja` package from PyPI
        import ninja  # type: ignore

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.exists():
            return str(candidate)
    except Exception:
        pass
    return None


def _is_cuda_toolkit(home: Optional[str]) -> bool:
    if not home:
        return False
    root = Path(home)
    has_header = (root / "include" / "cuda_runtime.h").exists() or any(
        root.glob("targets/*/include/cuda_runtime.h"))
    return (root / "bin" / "nvcc").exists() and has_header


def _find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root. torch's CUDA_HOME can be the parent of an `nvcc` wrapper script
    (e.g. /usr/local for /usr/local/bin/nvcc), which holds no toolkit: skip such candidates."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils import cpp_extension

        candidates.append(cpp_extension.CUDA_HOME)
    except Exception:
        pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if _is_cuda_toolkit(home):
            return str(Path(home).resolve())
    return None


def _arch_list_to_cmake(arch_list: str) -> List[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.6 9.0a") -> CMAKE_CUDA_ARCHITECTURES ["80", "90"]."""
    archs = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        item = item.replace("+PTX", "")
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", item)
        if match:
            arch = match.group(1) + match.group(2) + match.group(3)
            if arch not in archs:
                archs.append(arch)
    return archs


def _cuda_plan(torch) -> Tuple[bool, Optional[str], List[str], str]:
    """(build CUDA?, toolkit root, CMake arch list, why not) following SMARTFRZ_BUILD_CUDA."""
    mode = os.environ.get("SMARTFRZ_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode in ("0", "off", "false", "no"):
        return False, None, [], "SMARTFRZ_BUILD_CUDA=0"
    if mode not in ("auto", "1", "on", "true", "yes"):
        raise SystemExit(f"SMARTFRZ_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    required = mode != "auto"
    missing = []
    if not torch.version.cuda:
        missing.append(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    home = _find_cuda_home()
    if home is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc and include/)")
    archs: List[str] = []
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = _arch_list_to_cmake(os.environ["TORCH_CUDA_ARCH_LIST"])
        if not archs:
            missing.append(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} names no arch")
    elif torch.version.cuda:
        try:
            if torch.cuda.is_available():
                for index in range(torch.cuda.device_count()):
                    major, minor = torch.cuda.get_device_capability(index)
                    if f"{major}{minor}" not in archs:
                        archs.append(f"{major}{minor}")
        except Exception:
            archs = []
        if not archs:
            missing.append("no GPU is visible and TORCH_CUDA_ARCH_LIST is not set")
    if missing:
        why = "; ".join(missing)
        if required:
            raise SystemExit(f"SMARTFRZ_BUILD_CUDA={mode} but the CUDA kernels cannot be built: {why}")
        return False, None, [], why
    return True, home, archs, ""


def _build_root() -> Path:
    return Path(os.environ.get("SMARTFRZ_BUILD_DIR") or ROOT / "build").resolve()


def _cmake_build_dir(torch) -> Path:
    """A CMake build folder kept between installs (editable installs build in a fresh temporary
    folder each time; this one makes rebuilds incremental), one per interpreter and torch."""
    key = f"{sys.executable}|{Path(torch.__file__).parent}|{torch.__version__}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    return _build_root() / f"cmake-{sys.implementation.cache_tag}-{tag}"


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; on failure warn and install without the extension
    (unless SMARTFRZ_REQUIRE_EXT=1)."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            if self._build_or_warn(ext):
                built.append(ext)
        # Forget failed extensions so that copying them (editable installs) and listing them in
        # the wheel's outputs do not fail.
        self.extensions[:] = built

    def _build_or_warn(self, ext: Extension) -> bool:
        log_path = _build_root() / "smartfrz-build.log"
        try:
            self._build_cmake(ext, log_path)
            return True
        except ExtensionBuildError as exc:
            message = self._failure_message(str(exc), log_path)
            if _env_flag("SMARTFRZ_REQUIRE_EXT"):
                raise SystemExit(message.replace("WARNING", "ERROR", 1) +
                                 "\nSMARTFRZ_REQUIRE_EXT=1: failing the install.") from exc
            print(message, file=sys.stderr, flush=True)
            return False

    @staticmethod
    def _failure_message(reason: str, log_path: Path) -> str:
        bar = "=" * 78
        log_hint = f"Full build log: {log_path}\n" if log_path.exists() else ""
        return (
            f"\n{bar}\n"
            f"WARNING: the compiled extension {EXT_NAME} was NOT built.\n"
            f"{textwrap.indent(reason.rstrip(), '  ')}\n\n"
            "smartfrz_fast is installed anyway and works: every op falls back to its pure-PyTorch\n"
            "reference (slower). `python -m smartfrz_fast.info` reports which backend runs.\n"
            f"{log_hint}"
            "To retry: install torch (and cmake >= 3.18, a C++20 compiler) first, then run\n"
            "    pip install --no-build-isolation -v -e .\n"
            "Set SMARTFRZ_REQUIRE_EXT=1 to make a failed build an error.\n"
            f"{bar}\n"
        )

    def _build_cmake(self, ext: Extension, log_path: Path) -> None:
        try:
            import torch
        except Exception as exc:  # e.g. an isolated build: torch is not a build requirement
            raise ExtensionBuildError(
                f"torch cannot be imported at build time ({type(exc).__name__}: {exc}).\n"
                "Install torch first and build without isolation (--no-build-isolation).") from exc
        cmake = _find_cmake()
        use_cuda, cuda_home, cuda_archs, no_cuda_reason = _cuda_plan(torch)

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = _cmake_build_dir(torch)
        build_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSMARTFRZ_BUILD_CUDA={'ON' if use_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DSMARTFRZ_TORCH_VERSION={torch.__version__}",
        ]
        generator = None
        ninja = _find_ninja()
        if ninja:
            generator = "Ninja"
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        env = dict(os.environ)
        if use_cuda:
            nvcc = str(Path(cuda_home) / "bin" / "nvcc")
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_home}",
                     f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(cuda_archs)}"]
            env.update(CUDA_HOME=cuda_home, CUDACXX=nvcc)
            env.setdefault("TORCH_CUDA_ARCH_LIST",
                           ";".join(f"{a[:-1]}.{a[-1]}" for a in cuda_archs))
        args += shlex.split(os.environ.get("SMARTFRZ_CMAKE_ARGS", ""))
        self._drop_stale_cache(build_dir, generator)

        print(f"smartfrz_fast: building {EXT_NAME} with CMake (torch {torch.__version__}, CUDA kernels: "
              f"{'yes, archs ' + ';'.join(cuda_archs) if use_cuda else 'no (' + no_cuda_reason + ')'})",
              flush=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        start = time.time()
        with open(log_path, "w", encoding="utf-8") as log:
            self._run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], env, log, "CMake configure")
            self._run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], env, log,
                      "CMake build")
        if not ext_path.exists():  # CMake chose another suffix than setuptools: use setuptools' name
            produced = sorted(out_dir.glob("_C.*.so")) + sorted(out_dir.glob("_C.*.pyd"))
            if not produced:
                raise ExtensionBuildError(f"CMake finished but produced no _C module in {out_dir}")
            shutil.move(str(produced[0]), ext_path)
        print(f"smartfrz_fast: built {ext_path.name} in {time.time() - start:.1f} s", flush=True)

    @staticmethod
    def _drop_stale_cache(build_dir: Path, generator: Optional[str]) -> None:
        """A build folder configured with another generator (or moved) cannot be reused."""
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():
            return
        text = cache.read_text(encoding="utf-8", errors="replace")
        old = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", text, re.M)
        home = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", text, re.M)
        if (old and generator and old.group(1) != generator) or (home and Path(home.group(1)) != ROOT):
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)

    @staticmethod
    def _run(cmd: List[str], env: dict, log, what: str) -> None:
        """Run cmd, echo and log its output; raise ExtensionBuildError with its tail if it fails."""
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        tail: collections.deque = collections.deque(maxlen=25)
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
        except OSError as exc:
            raise ExtensionBuildError(f"{what} could not start: {exc}") from exc
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
        rc = proc.wait()
        sys.stdout.flush()
        if rc != 0:
            raise ExtensionBuildError(f"{what} failed (exit status {rc}); last lines:\n" + "".join(tail))


setup(
    name="smartfrz_fast",
    version=read_version(),
    description="Fast SmartFRZ layer freezing for PyTorch (attention-based freezing predictor)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # torch is NOT listed: install the torch build you want first (a bare `torch` requirement
    # would pull a multi-GB CUDA wheel), then `pip install --no-build-isolation .`.
    install_requires=["numpy", "tqdm"],
    extras_require={
        "demo": ["scikit-learn"],
        "triton": ["triton>=3.6"],
        "lightning": ["lightning>=2.2"],
        "hf": ["transformers>=4.40", "accelerate>=0.26"],
        "plot": ["matplotlib"],
        # "test" pulls in every optional stack the tests exercise. triton <3.9: 3.8.0 lies on
        # local disk (CI downloads nothing); 3.6 is the GPU image's. The kernels' interpreter
        # tests pass on 3.6.0 (with numpy < 2.4), 3.7.1 and 3.8.0 (docs/gpu_kernels.md).
        "test": ["pytest", "pytest-benchmark", "triton>=3.6,<3.9; platform_system == 'Linux'",
                 "lightning>=2.2", "transformers>=4.40", "accelerate>=0.26", "datasets>=2.14", "matplotlib"],
    },
    packages=find_packages(include=["smartfrz_fast", "smartfrz_fast.*"]),
    package_data={"smartfrz_fast": ["predictor/weights/*.pt"]},
    include_package_data=True,
    entry_points={"console_scripts": ["smartfrz-fast=smartfrz_fast.cli:main"]},
    ext_modules=[CMakeExtension(EXT_NAME)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
