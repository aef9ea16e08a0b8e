"""Build hook: compiles csrc/ into the CUDA extension `rwkv_app._wkv7_cuda` when it can, else a pure-Python install.

Everything else about the package lives in pyproject.toml. Environment:
  RWKV_APP_BUILD_CUDA=1   build the extension or fail with the reason (needs nvcc and a CUDA build of torch;
                          with pip, install with --no-build-isolation so the build sees your torch)
  RWKV_APP_BUILD_CUDA=0   never build it
  (unset)                 build it when nvcc and a CUDA build of torch are both present
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default here: 8.0;8.6;8.9;9.0)
Development build in place:  RWKV_APP_BUILD_CUDA=1 python setup.py build_ext --inplace
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
ENV = "RWKV_APP_BUILD_CUDA"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _say(message: str) -> None:
    print(f"rwkv-app setup: {message}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_torch() -> tuple[bool, str]:
    """Whether the importable torch is a CUDA build, and why not."""
    try:
        import torch
    except ImportError:
        return False, "torch is not importable in the build environment (pip: use --no-build-isolation)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def _want_cuda() -> bool:
    mode = os.environ.get(ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"rwkv-app setup: environment {ENV}={mode!r}: expected 0, 1 or unset")
    if mode == "0":
        _say(f"{ENV}=0: pure-Python install (no CUDA kernels)")
        return False
    nvcc = _find_nvcc()
    torch_ok, torch_why = _cuda_torch()
    if nvcc and torch_ok:
        return True
    why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)" if not nvcc else torch_why
    if mode == "1":
        raise SystemExit(f"rwkv-app setup: {ENV}=1 but the CUDA extension cannot be built: {why}")
    _say(f"pure-Python install (no CUDA kernels): {why}")
    return False


def _extension_kwargs() -> dict:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    _say(f"building the CUDA extension rwkv_app._wkv7_cuda for TORCH_CUDA_ARCH_LIST={archs}")
    ext = CUDAExtension(
        name="rwkv_app._wkv7_cuda",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-Xptxas=-warn-spills", "-lineinfo"],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**(_extension_kwargs() if _want_cuda() else {}))
