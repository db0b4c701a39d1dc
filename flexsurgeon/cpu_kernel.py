"""FlexPool's fused CPU kernel: one pass over the input, for inference in float32.

PyTorch has no single op for ``y[b, c] = sum_s x[b, c, s] * a[c, s]``: a multiply and a
sum write and re-read a temporary the size of ``x``, which keeps the eager FlexPool at
about 2-3x of ``x.mean((2, 3))``. ``csrc/flex_pool_cpu.cpp`` reads ``x`` once, in either
memory layout, on torch's own thread pool.

It is compiled with ``torch.utils.cpp_extension`` on the first FlexPool inference call
that can use it (about 20 s on 2 cores; needs a C++ compiler and ninja) and cached in
torch's extension folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
so later processes load it in milliseconds. If it cannot be built, FlexPool warns once
and keeps using its ATen formulations. ``FLEXSURGEON_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

ENV_VAR = "FLEXSURGEON_CPU_KERNEL"
_SOURCE = Path(__file__).parent / "csrc" / "flex_pool_cpu.cpp"
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None  # why the kernel is not available; set at most once per process


def _build_options() -> tuple[str, list[str], list[str]]:
    """Extension name and compiler / linker flags for this machine.

    The name carries the instruction set, so a cache folder shared between machines never
    hands one a binary it cannot run. OpenMP is torch's own thread pool on Linux (the
    extension links the libgomp torch already loaded); elsewhere the kernel runs on one
    thread. Windows builds with MSVC, which spells its flags differently.
    """
    msvc = sys.platform == "win32"
    cflags, ldflags, isa = ["/O2" if msvc else "-O3"], [], "generic"
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        cflags += ["/arch:AVX2"] if msvc else ["-mavx2", "-mfma"]
        isa = "avx2"
    return f"flexsurgeon_flex_pool_{isa}", cflags, ldflags


def _build() -> ModuleType:
    # Importing cpp_extension on a CUDA build of torch logs a CUDA_HOME warning; this
    # kernel is CPU-only, so that warning would only confuse.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_log.setLevel(level)

    name, cflags, ldflags = _build_options()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    # One folder per Python and torch version: a binary is only valid for the torch it was built against.
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}".replace("+", "-")
    build_dir = Path(root) / f"{name}-{tag}"
    if not (build_dir / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}").exists():  # cpp_extension's names
        _log.warning("FlexPool: compiling its fused CPU kernel into %s, once (about 20 s; %s=0 skips it)",
                     build_dir, ENV_VAR)
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
                              build_directory=str(build_dir))


def load() -> ModuleType | None:
    """The compiled extension, building it on first use; None where it is off or failed."""
    global _module, _error
    if _module is None and _error is None:
        with _lock:
            if _module is None and _error is None:
                if os.environ.get(ENV_VAR, "1") == "0":
                    _error = f"turned off by {ENV_VAR}=0"
                else:
                    try:
                        _module = _build()
                    except Exception as e:  # noqa: BLE001 - any build failure means: use ATen
                        reason = str(e).strip().splitlines()
                        _error = f"{type(e).__name__}: {reason[0] if reason else 'no message'}"
                        warnings.warn(f"FlexPool: the fused CPU kernel could not be built ({_error}); "
                                      f"using the ATen formulations, which are slower on CPU", RuntimeWarning,
                                      stacklevel=2)
    return _module


def available() -> bool:
    """True when the kernel is built (or can be built now) and not turned off."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not in use, after ``load()``; None when it is."""
    return _error


def weighted_sum(x: torch.Tensor, a: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``y[b, c] = sum_{h,w} a[c, h, w] * x[b, c, h, w]`` as a (B, C) tensor, in one pass.

    ``x``: float32 CPU (B, C, H, W), contiguous in NCHW, or in channels_last when
    ``channels_last``. ``a``: contiguous float32, (1, C, H*W) for NCHW or (1, H*W, C) for
    channels_last. The kernel checks all of this and raises rather than read out of bounds.
    """
    module = load()
    if module is None:
        raise RuntimeError(f"the fused FlexPool CPU kernel is not available: {_error}")
    return module.weighted_sum(x, a, channels_last)
