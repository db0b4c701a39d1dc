"""Tests for flexsurgeon.cpu_kernel: the fused FlexPool CPU kernel and its fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from flexsurgeon import cpu_kernel
from flexsurgeon.layers import FlexPool, _inference_kernel

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(),
                                  reason=f"fused CPU kernel not available: {cpu_kernel.unavailable_reason()}")


def _case(shape, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.randn(shape, generator=g)
    a = torch.rand(c, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        a_kernel = a.flatten(1).t().contiguous()[None]  # (1, H*W, C)
    else:
        a_kernel = a.flatten(1)[None]  # (1, C, H*W)
    expected = (x.double() * a.double()).sum((2, 3)).float()
    return x, a_kernel, expected


# Positions around the 8- and 16-wide vector steps (1, 7, 8, 15, 16, 17, 49, 196) and
# channels around the 256-channel blocks of the channels_last loop.
SHAPES = [(2, 3, 1, 1), (1, 5, 1, 7), (3, 4, 2, 4), (2, 6, 3, 5), (2, 2, 4, 4), (1, 9, 1, 17),
          (2, 256, 7, 7), (3, 257, 7, 7), (1, 600, 14, 14), (5, 33, 6, 6), (0, 4, 3, 3)]


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernel_matches_float64_reference(shape, channels_last):
    x, a, expected = _case(shape, channels_last)
    y = cpu_kernel.weighted_sum(x, a, channels_last)
    assert y.shape == shape[:2] and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_result_does_not_depend_on_thread_count(channels_last):
    x, a, _ = _case((6, 300, 7, 7), channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.weighted_sum(x, a, channels_last)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, cpu_kernel.weighted_sum(x, a, channels_last))


@needs_kernel
def test_fused_kernel_refuses_inputs_it_would_misread():
    x, a, _ = _case((2, 8, 4, 4), False)
    bad = [
        (x.contiguous(memory_format=torch.channels_last), a, False, "not contiguous"),  # layout flag wrong
        (x, a, True, "not contiguous"),
        (x.double(), a, False, "float32"),
        (x[:, :, :3], a, False, "contiguous"),  # a strided view
        (x, a[:, :4], False, "C\\*H\\*W"),
        (x[0], a, False, "4-D"),
    ]
    for xs, as_, cl, message in bad:
        with pytest.raises(RuntimeError, match=message):
            cpu_kernel.weighted_sum(xs, as_, cl)


def test_flexpool_falls_back_to_aten_with_one_warning_when_the_build_fails(monkeypatch):
    def fail():
        raise OSError("no C++ compiler found\ndetails")

    monkeypatch.delenv(cpu_kernel.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_error", None)
    monkeypatch.setattr(cpu_kernel, "_build", fail)
    pool = FlexPool(6, (8, 8)).eval()
    with torch.no_grad():
        pool.weight.normal_()
    x = torch.randn(16, 6, 8, 8)
    with pytest.warns(RuntimeWarning, match="could not be built \\(OSError: no C\\+\\+ compiler found\\)"):
        assert _inference_kernel(x) == "bmm"
    expected = (x * pool.weight.flatten(1).softmax(-1).view(1, 6, 8, 8)).sum((2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per process
        with torch.no_grad():
            torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-6)
    assert cpu_kernel.unavailable_reason() == "OSError: no C++ compiler found"


@pytest.mark.parametrize("system,machine,capability,expected", [
    ("linux", "x86_64", "AVX512", ("flexsurgeon_flex_pool_avx2", ["-O3", "-fopenmp", "-mavx2", "-mfma"], ["-fopenmp"])),
    ("linux", "x86_64", "DEFAULT", ("flexsurgeon_flex_pool_generic", ["-O3", "-fopenmp"], ["-fopenmp"])),
    ("linux", "aarch64", "DEFAULT", ("flexsurgeon_flex_pool_generic", ["-O3", "-fopenmp"], ["-fopenmp"])),
    ("darwin", "arm64", "DEFAULT", ("flexsurgeon_flex_pool_generic", ["-O3"], [])),
    ("win32", "AMD64", "AVX2", ("flexsurgeon_flex_pool_avx2", ["/O2", "/arch:AVX2"], [])),
])
def test_build_flags_suit_the_compiler_and_instruction_set(monkeypatch, system, machine, capability, expected):
    """A binary built for AVX2 is named for it, so a shared cache never hands it to a CPU
    without; MSVC gets its own spelling of the flags (gcc's would be ignored, unoptimised)."""
    monkeypatch.setattr(cpu_kernel.sys, "platform", system)
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_kernel._build_options() == expected


def test_environment_variable_turns_the_kernel_off():
    code = ("import warnings; warnings.simplefilter('error');"
            "import torch; from flexsurgeon import cpu_kernel; from flexsurgeon.layers import _inference_kernel;"
            "print(_inference_kernel(torch.randn(16, 6, 8, 8)), cpu_kernel.unavailable_reason())")
    env = dict(os.environ, **{cpu_kernel.ENV_VAR: "0"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"bmm turned off by {cpu_kernel.ENV_VAR}=0"
    assert "compiling" not in out.stderr


@needs_kernel
def test_fake_tensors_never_reach_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    pool = FlexPool(6, (8, 8)).eval()
    with torch.no_grad():
        pool(torch.randn(16, 6, 8, 8))  # the inference fast path now holds the fused kernel
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        x = mode.from_tensor(torch.randn(16, 6, 8, 8))
        assert _inference_kernel(x) != "fused-rows"
        y = pool(x)
    assert y.shape == (16, 6)


@needs_kernel
def test_dispatch_modes_see_flexpool_as_aten_ops():
    """FlopCounterMode, memory trackers and a user's own TorchDispatchMode see ATen calls only:
    under one, FlexPool must not hide its work inside the fused kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    pool = FlexPool(6, (8, 8)).eval()
    x = torch.randn(16, 6, 8, 8)
    with torch.no_grad():
        expected = pool(x)  # the inference fast path now holds the fused kernel
        with Recorder() as recorder:
            got = pool(x)
    assert recorder.calls and any(name.startswith(("aten.mul", "aten.bmm")) for name in recorder.calls)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
