"""FlexPool and SAC heads: the layers flexsurgeon installs.

FlexPool is a learned global weighted average pool, one weight per channel and
position; SACHead is FlexPool followed by a single linear classifier (a "simple
auxiliary classifier"). Both come from Ali, Alsuwaidi and Khan, "FlexPooling with
Simple Auxiliary Classifiers in Deep Networks", VISAPP 2023 (reference code:
github.com/aliman80/FlexPoolU). See shared/METHOD.md for the method in our words.

Public names: ``flex_pool2d`` (functional form), ``FlexPool``, ``SACHead``,
``GlobalPool`` and ``make_pool`` (FlexPool or a baseline pool, by kind), ``POOL_MODES``
(FlexPool's parametrisations) and ``POOL_KINDS`` (those plus the baselines).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel
from .pool_kinds import BASELINE_POOLS, POOL_KINDS, POOL_MODES

__all__ = ["POOL_KINDS", "POOL_MODES", "FlexPool", "GlobalPool", "SACHead", "flex_pool2d", "make_pool"]


def _pair(size: tuple[int, int] | int, name: str = "size") -> tuple[int, int]:
    """Return ``size`` as a pair of positive ints, or raise ValueError naming it."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}")
    return pair  # type: ignore[return-value]


def _check_mode(mode: str) -> str:
    if mode not in POOL_MODES:
        raise ValueError(f"unknown FlexPool mode {mode!r}; choose one of {', '.join(map(repr, POOL_MODES))}")
    return mode


# How the weighted sum is computed. "rows" and "cols" (one multiply, one reduction) run
# everywhere and under autograd. For inference on CPU in float32 the fused kernels
# (cpu_kernel.py) read x once; where that kernel cannot be built, "bmm" and "conv" do so
# for large inputs (benchmarks/overhead.py, RESULTS.md).
_ROWS, _COLS, _BMM, _CONV = "rows", "cols", "bmm", "conv"
_FUSED_ROWS, _FUSED_COLS = "fused-rows", "fused-cols"
# Below these sizes the plain multiply-reduce was faster than bmm / conv on the CPU we measured.
_BMM_MIN_COLUMNS = 512  # batch * H * W of an NCHW input
_CONV_MIN_NUMEL = 1 << 20  # elements of a channels_last input


def _training_kernel(x: torch.Tensor) -> str:
    """The multiply-reduce laid out like ``x``; also the form compile / export / FX record."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return _COLS if channels_last else _ROWS


def _inference_kernel(x: torch.Tensor) -> str:
    """The fastest form when no autograd graph is recorded.

    On CPU in float32: the fused kernel (one pass over x, 0.5-1.4x of the mean's time),
    or without it ``_aten_inference_kernel``'s choice. Elsewhere the multiply-reduce.
    """
    kernel = _training_kernel(x)
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous(memory_format=_FORMATS[kernel]):
        return kernel
    # The kernel reads memory directly: plain tensors only (not fake, functional or distributed
    # ones), and not under a dispatch mode (FlopCounterMode, a user's tracer), which sees ATen ops only.
    if type(x) is torch.Tensor and not torch._C._len_torch_dispatch_stack() and cpu_kernel.available():
        return _FUSED_COLS if kernel == _COLS else _FUSED_ROWS
    return _aten_inference_kernel(x)


def _aten_inference_kernel(x: torch.Tensor) -> str:
    """The fastest ATen form for a float32 CPU input, when the fused kernel is not built.

    Large inputs avoid the multiply's temporary the size of ``x`` (up to 17x of the mean
    at batch 128 from the page faults alone): NCHW goes through one strided
    (1 x H*W) @ (H*W x B) matmul per channel, which reads x's memory in place;
    channels_last through a depthwise convolution whose kernel is the whole map (oneDNN).
    Their backward is 4-80x slower than the multiply-reduce's, hence inference only.
    """
    kernel = _training_kernel(x)
    if kernel == _ROWS and x.shape[0] * x.shape[2] * x.shape[3] >= _BMM_MIN_COLUMNS:
        return _BMM
    if kernel == _COLS and x.numel() >= _CONV_MIN_NUMEL:
        return _CONV
    return kernel


_FORMATS = {_ROWS: torch.contiguous_format, _COLS: torch.channels_last}
# Kernels that take the weights as (1, H*W, C), matching channels_last input.
_COLS_WEIGHTS = (_COLS, _FUSED_COLS)


def _normalized_weight(
    weight: torch.Tensor,
    mode: str,
    native: tuple[int, int],
    size: tuple[int, int],
    dtype: torch.dtype,
    kernel: str = _ROWS,
) -> torch.Tensor:
    """Pooling weights ``A`` at ``size``, in ``dtype``, laid out for ``_weighted_sum``.

    Returns (1, C, H*W), or (1, H*W, C) contiguous for the channels_last multiply-reduce
    ("cols"). ``native`` is ``weight``'s own (H, W), passed in so that this also runs
    on FX proxies.

    softmax: the logits are resampled bilinearly (only when ``size`` differs from the
    native size), then normalised per channel in float32. linear: the weights are
    resampled bilinearly and each channel rescaled so its sum is unchanged.
    """
    w = weight.unsqueeze(0)
    if mode == "softmax":
        w = w.float()
        if size != native:
            w = F.interpolate(w, size=size, mode="bilinear", align_corners=False)
        a = w.flatten(2).softmax(-1)
    else:
        a = w.flatten(2)
        if size != native:
            resampled = F.interpolate(w.float(), size=size, mode="bilinear", align_corners=False).flatten(2)
            old_sum = a.float().sum(-1, keepdim=True)
            new_sum = resampled.sum(-1, keepdim=True)
            # Preserve each channel's sum; where the resampled sum is ~0 the ratio is
            # meaningless, so fall back to the area ratio (exact for constant weights).
            area = (native[0] * native[1]) / (size[0] * size[1])
            ok = new_sum.abs() > torch.finfo(torch.float32).tiny
            scale = torch.where(ok, old_sum / torch.where(ok, new_sum, 1.0), area)
            a = resampled * scale
    a = a.to(dtype)
    if kernel in _COLS_WEIGHTS:
        a = a.transpose(1, 2).contiguous()
    return a


def _weighted_sum(x: torch.Tensor, a: torch.Tensor, kernel: str, flatten: bool) -> torch.Tensor:
    """``y[b, c] = sum_{h,w} A[c,h,w] * x[b,c,h,w]``, with ``a`` from ``_normalized_weight``.

    "rows"/"cols": one multiply and one reduction over a 3-D view that matches ``x``'s
    memory layout ((B, C, H*W) rows for NCHW, (B, H*W, C) for channels_last), so the
    product, the reduction and the backward's broadcasts all stream through memory in
    order (the 4-D ``(x * a).sum((2, 3))`` is as fast forward but 3-7x slower backward).
    "fused-rows"/"fused-cols": ``cpu_kernel.weighted_sum``. "bmm"/"conv": see
    ``_aten_inference_kernel``.
    """
    if kernel == _ROWS:
        y = (x.flatten(2) * a).sum(-1)
    elif kernel == _COLS:
        y = (x.permute(0, 2, 3, 1).flatten(1, 2) * a).sum(1)
    elif kernel in (_FUSED_ROWS, _FUSED_COLS):
        y = cpu_kernel.weighted_sum(x, a, kernel == _FUSED_COLS)
    elif kernel == _BMM:
        b, c = x.shape[:2]
        # (C, 1, HW) @ (C, HW, B): x's NCHW memory is a column-major (HW x B) matrix per
        # channel. y comes out transposed; a copy to row-major would cost as much as the
        # product, and the layers that follow (linear, flatten, view) take it as it is.
        y = torch.bmm(a.view(c, 1, -1), x.flatten(2).permute(1, 2, 0)).view(c, b).t()
    else:
        c, h, w = x.shape[1:]
        y = F.conv2d(x, a.view(c, 1, h, w), groups=c).flatten(1)
    return y if flatten else y[:, :, None, None]


def _check_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"FlexPool expects a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"FlexPool weight must be 3-D (C, H, W), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"input has {x.shape[1]} channels but the FlexPool weight has {weight.shape[0]}")


def flex_pool2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mode: str = "softmax",
    flatten: bool = True,
) -> torch.Tensor:
    """Learned global weighted average pool: ``y[b, c] = sum_{h,w} A[c,h,w] x[b,c,h,w]``.

    Args:
        x: input (B, C, H', W'), NCHW or channels_last, float32/bfloat16/float16.
        weight: (C, H, W) logits (softmax mode) or weights (linear mode).
        mode: "softmax" (``A[c] = softmax(weight[c].flatten())``) or "linear" (``A = weight``).
        flatten: return (B, C) when True, (B, C, 1, 1) when False.

    If (H', W') != (H, W) the weights are resampled, see ``FlexPool``. The output has
    the dtype of ``x``.
    """
    _check_mode(mode)
    _check_input(x, weight)
    kernel = _training_kernel(x) if _records_graph(x, weight) else _inference_kernel(x)
    a = _normalized_weight(weight, mode, tuple(weight.shape[-2:]), tuple(x.shape[-2:]), x.dtype, kernel)
    return _weighted_sum(x, a, kernel, flatten)


_st = torch.fx._symbolic_trace
# True inside torch.fx.symbolic_trace (and not, unlike is_fx_tracing, under export).
_fx_symbolic_tracing = getattr(_st, "is_fx_symbolic_tracing", _st.is_fx_tracing)


# torch < 2.5 has no is_exporting; its export is strict (dynamo) only, which is_compiling sees.
_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)


def _compiling() -> bool:
    """True under torch.compile, torch.export (strict or not) or torch.jit.trace."""
    return torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()


def _transformed(t: torch.Tensor) -> bool:
    """True for a tensor wrapped by a torch.func transform (vmap, grad, ...)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _records_graph(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when autograd, a compiler, an exporter or a torch.func transform sees this call."""
    return (
        (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or _compiling()
        or _transformed(x)
        or _transformed(weight)
    )


class _TimmPoolInterface:
    """What timm's model code reads from the ``global_pool`` it built (``SelectAdaptivePool2d``),
    so a pool swapped in for one keeps ``reset_classifier`` and friends working. ``pool_type``
    is what timm rebuilds in its place on ``reset_classifier``; flexsurgeon then puts it back."""

    pool_type = "avg"

    def feat_mult(self) -> int:
        return 1

    def is_identity(self) -> bool:
        return False


class FlexPool(_TimmPoolInterface, nn.Module):
    """FlexPool: global pooling with a learned weight per channel and position.

    ``y[b, c] = sum_{h,w} A[c, h, w] * x[b, c, h, w]`` where, for the parameter
    ``weight`` of shape (C, H, W):

    - mode "softmax" (default, the reference code's form): ``A[c] = softmax(weight[c].flatten())``;
    - mode "linear" (the paper's text): ``A = weight``; add ``regularizer()`` (times a
      coefficient) to the loss to keep each channel's weights summing to one.

    ``weight`` starts at the constant ``1 / (H * W)``, so at initialisation FlexPool is
    exactly global average pooling (equal to ``x.mean((2, 3))`` up to float rounding):
    converting a pretrained model preserves its function.

    Input size: ``weight`` is bound to the feature-map size ``size``. At that size the
    weights are used as they are. At any other size they are resampled bilinearly
    (``align_corners=False``): softmax mode resamples the logits and then normalises,
    so constant logits stay uniform (still average pooling at init); linear mode
    resamples the weights and rescales each channel so its sum is unchanged (a channel
    whose resampled sum is zero is scaled by the area ratio instead). A 1x1
    feature map makes FlexPool a no-op; this warns once per module.

    Dropout (``drop``, identity for p=0) is applied to the pooled vector in train mode.

    Speed: in training the weighted sum is one multiply and one reduction, with the
    weights laid out to match the input's memory format (NCHW or channels_last). At
    inference on CPU in float32, a fused C++ kernel (``flexsurgeon.cpu_kernel``, compiled
    on first use) reads the input once; where it cannot be built, large inputs go through
    a strided batched matmul (NCHW) or a whole-map depthwise convolution (channels_last).
    The result is the same up to float rounding (see ``_inference_kernel``). When no gradient
    for ``weight`` is recorded (eval / no_grad / inference_mode) the normalised
    weights are cached, keyed on the weight's version, device, dtype, size and layout,
    so an in-place update (optimizer step, ``load_state_dict``) invalidates the cache.
    A repeated inference call on the same kind of input reuses the last call's kernel
    and weights without re-checking. The caches are bypassed while tracing, compiling or
    exporting, and are not part of ``state_dict``.
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] | int,
        mode: str = "softmax",
        dropout: float = 0.0,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.size = _pair(size)
        self.mode = _check_mode(mode)
        self.flatten = flatten
        self.weight = nn.Parameter(torch.empty(channels, *self.size))
        self.drop = nn.Dropout(dropout)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        # (weight, its version and data pointer, x's shape, strides, dtype, device, kernel,
        # weights): the last inference call's decisions, reused while none of them changes.
        self._fast: tuple | None = None
        self._warned_1x1 = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the weights to the constant ``1 / (H * W)``: exact average pooling."""
        with torch.no_grad():
            self.weight.fill_(1.0 / (self.size[0] * self.size[1]))

    def regularizer(self) -> torch.Tensor:
        """``sum_c (sum_{h,w} W[c,h,w] - 1)^2`` in linear mode; a zero tensor in softmax mode."""
        if self.mode != "linear":
            return self.weight.new_zeros(())
        return (self.weight.sum((1, 2)) - 1.0).square().sum()

    def pooling_weights(self, size: tuple[int, int] | int | None = None) -> torch.Tensor:
        """The weights ``A`` (C, H, W) this pool applies to an H x W map (default: its own
        size), in float32: each channel's softmax in softmax mode, the weights resampled
        with their sum kept in linear mode. Differentiable; ``y[b, c] = (A[c] * x[b, c]).sum()``."""
        size = self.size if size is None else _pair(size)
        a = _normalized_weight(self.weight, self.mode, self.size, size, torch.float32)
        return a.view(self.channels, *size)

    def _weights_for(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """Normalised weights for ``x``. Cached unless a graph records the weight: the
        key holds the weight's in-place version and the input's dtype, size and layout."""
        w, size = self.weight, (x.shape[-2], x.shape[-1])
        # _compiling() first: dynamo cannot trace is_inference().
        if _compiling() or (torch.is_grad_enabled() and w.requires_grad) or _transformed(w) or w.is_inference():
            return _normalized_weight(w, self.mode, self.size, size, x.dtype, kernel)
        key = (id(w), w.data_ptr(), w._version, w.device, x.dtype, size, kernel in _COLS_WEIGHTS)
        cache = self._cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                a = _normalized_weight(w, self.mode, self.size, size, x.dtype, kernel)
            self._cache = cache = (key, a)
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference on the same kind of input as last time: skip the checks and the kernel
        # choice (4-8 us of Python; the mean at batch 1 takes 8 us). `is` before `_version`:
        # a tensor the cache did not see may be an inference tensor, which has no version.
        fast = self._fast
        if (fast is not None and not torch.is_grad_enabled() and type(x) is torch.Tensor
                and not _compiling() and not torch._C._len_torch_dispatch_stack() and not _transformed(x)):
            w = self.weight
            if (fast[0] is w and fast[1] == w._version and fast[2] == w.data_ptr() and fast[3] == x.shape
                    and fast[4] == x.stride() and fast[5] == x.dtype and fast[6] == x.device):
                y = _weighted_sum(x, fast[8], fast[7], self.flatten)
                return self.drop(y) if self.training and self.drop.p > 0 else y
        if _fx_symbolic_tracing():
            # FX proxies carry no shapes: record the native-size NCHW form.
            a = _normalized_weight(self.weight, self.mode, self.size, self.size, x.dtype)
            y = _weighted_sum(x, a, _ROWS, self.flatten)
            return self.drop(y) if self.training and self.drop.p > 0 else y
        _check_input(x, self.weight)
        if x.shape[-2] == 1 and x.shape[-1] == 1 and not self._warned_1x1 and not _compiling():
            self._warned_1x1 = True
            warnings.warn(
                f"FlexPool got a 1x1 feature map (input {tuple(x.shape)}): it is a no-op at this "
                f"input size (its weights are {self.size[0]}x{self.size[1]}); use a larger input",
                UserWarning,
                stacklevel=2,
            )
        w = self.weight
        recording = _records_graph(x, w)
        kernel = _training_kernel(x) if recording else _inference_kernel(x)
        a = self._weights_for(x, kernel)
        if not recording and not torch.is_grad_enabled() and not w.is_inference():
            self._fast = (w, w._version, w.data_ptr(), x.shape, x.stride(), x.dtype, x.device, kernel, a)
        y = _weighted_sum(x, a, kernel, self.flatten)
        return self.drop(y) if self.training and self.drop.p > 0 else y

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self._cache = self._fast = None  # .to() / .half() etc.: drop weights cached for the old tensor
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state["_cache"] = state["_fast"] = None
        return state

    def extra_repr(self) -> str:
        s = f"channels={self.channels}, size={self.size}, mode={self.mode!r}, dropout={self.drop.p}"
        if not self.flatten:
            s += ", flatten=False"
        return s


class GlobalPool(_TimmPoolInterface, nn.Module):
    """A global pool that is not FlexPool, with FlexPool's interface, for ablation baselines.

    kind "avg": ``x.mean((2, 3))`` (what the source did; no parameters); "lse": timm's
    ``LsePlus2d`` (log-sum-exp, a learnable temperature between average and max pooling);
    "simpool": timm's ``SimPool2d`` (attention with the average as query). lse and simpool
    do not start out as average pooling, so a model converted with them changes its output.
    """

    def __init__(self, kind: str, channels: int, dropout: float = 0.0, flatten: bool = True) -> None:
        super().__init__()
        if kind not in BASELINE_POOLS:
            raise ValueError(f"unknown baseline pool {kind!r}; choose one of {', '.join(BASELINE_POOLS)}")
        self.kind, self.channels, self.flatten = kind, channels, flatten
        self.pool = None if kind == "avg" else _timm_pool(kind, channels)
        self.drop = nn.Dropout(dropout)

    def regularizer(self) -> torch.Tensor:
        return torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)) if self.pool is None else self.pool(x)
        if self.training and self.drop.p > 0:
            y = self.drop(y)
        return y if self.flatten else y[:, :, None, None]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, channels={self.channels}, dropout={self.drop.p}"


def _timm_pool(kind: str, channels: int) -> nn.Module:
    import timm.layers

    name = {"lse": "LsePlus2d", "simpool": "SimPool2d"}[kind]
    cls = getattr(timm.layers, name, None)
    if cls is None:
        raise ValueError(f"pool {kind!r} needs timm's {name}, which this timm ({timm.__version__}) does not have; "
                         "upgrade timm")
    return cls(flatten=True) if kind == "lse" else cls(channels)


def make_pool(kind: str, channels: int, size: tuple[int, int] | int, dropout: float = 0.0,
              flatten: bool = True) -> nn.Module:
    """FlexPool for kinds "softmax" and "linear", else the baseline ``GlobalPool``."""
    if kind in POOL_MODES:
        return FlexPool(channels, size, mode=kind, dropout=dropout, flatten=flatten)
    return GlobalPool(kind, channels, dropout=dropout, flatten=flatten)


class SACHead(nn.Module):
    """Simple auxiliary classifier: a global pool (``pool``) then one ``nn.Linear`` (``fc``).

    No convolutions, no hidden layers (the paper's SAC). The pool is FlexPool, or for
    ablation baselines another kind (see ``make_pool``). Used during training only;
    ``regularizer()`` returns the pool's regulariser (zero except for linear FlexPool).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] | int,
        num_classes: int,
        mode: str = "softmax",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pool = make_pool(mode, channels, size, dropout=dropout, flatten=True)
        self.fc = nn.Linear(channels, num_classes)

    def regularizer(self) -> torch.Tensor:
        return self.pool.regularizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))
