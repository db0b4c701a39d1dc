"""FlexPool and SAC heads: the layers flexsurgeon installs.

FlexPool is a learned global weighted average pool, one weight per channel and
position; SACHead is FlexPool followed by a single linear classifier (a "simple
auxiliary classifier"). Both come from Ali, Alsuwaidi and Khan, "FlexPooling with
Simple Auxiliary Classifiers in Deep Networks", VISAPP 2023.

Public names: ``flex_pool2d`` (functional form), ``FlexPool``, ``FlexPoolNHWC`` (for a
(B, H, W, C) map), ``SACHead``, ``GlobalPool`` and ``make_pool`` (FlexPool or a baseline
pool, by kind), ``FLEXPOOL_KINDS`` (FlexPool's parametrisations) and ``POOL_KINDS`` (those
plus the baselines). The kind is the argument and attribute ``pool`` throughout; ``keepdim``
(default False, as in torch) returns (B, C, 1, 1) instead of (B, C).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import FLEXPOOL_KINDS, POOL_KINDS, SPATIAL_BASELINES

__all__ = ["FLEXPOOL_KINDS", "POOL_KINDS", "FlexPool", "FlexPoolNHWC", "GlobalPool", "flex_pool2d", "make_pool"]


def _pair(size: tuple[int, int] | int, name: str = "size") -> tuple[int, int]:
    """Return ``size`` as a pair of positive ints, or raise ValueError naming it."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}")
    return pair  # type: ignore[return-value]


def _check_pool(pool: str) -> str:
    if pool not in FLEXPOOL_KINDS:
        raise ValueError(f"unknown FlexPool pool {pool!r}; choose one of {', '.join(map(repr, FLEXPOOL_KINDS))}")
    return pool


def _normalized_weight(
    weight: torch.Tensor, pool: str, native: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Pooling weights ``A`` at ``size`` as (C, H*W).

    ``native`` is ``weight``'s own (H, W), passed in so that this also runs on FX proxies.
    softmax: the logits are resampled bilinearly (only when ``size`` differs from the
    native size), then normalised per channel in float32 (float64 for float64 weights).
    linear: the weights are resampled bilinearly and each channel rescaled so its sum is
    unchanged.
    """
    w = weight.unsqueeze(0)
    wide = torch.promote_types(weight.dtype, torch.float32)
    if pool == "softmax":
        w = w.to(wide)
        if size != native:
            w = F.interpolate(w, size=size, mode="bilinear", align_corners=False)
        return w.flatten(2).softmax(-1)[0]
    a = w.flatten(2)
    if size != native:
        resampled = F.interpolate(w.to(wide), size=size, mode="bilinear", align_corners=False).flatten(2)
        old_sum = a.to(wide).sum(-1, keepdim=True)
        new_sum = resampled.sum(-1, keepdim=True)
        # Preserve each channel's sum; where the resampled sum is ~0 the ratio is
        # meaningless, so fall back to the area ratio (exact for constant weights).
        area = (native[0] * native[1]) / (size[0] * size[1])
        ok = new_sum.abs() > torch.finfo(torch.float32).tiny
        scale = torch.where(ok, old_sum / torch.where(ok, new_sum, 1.0), area)
        a = resampled * scale
    return a[0]


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _sum_nchw(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``y[b, c] = sum_p a[c, p] x[b, c, p]`` as one (1 x HW) @ (HW x B) product per channel.

    In NCHW memory each channel of ``x`` is a column-major (HW x B) matrix, so bmm reads
    it in place and writes nothing the size of ``x``. ``y`` comes out transposed; the
    layers that follow (linear, flatten, dropout) take it as it is.
    """
    return torch.bmm(a.unsqueeze(1), x.flatten(2).permute(1, 2, 0)).squeeze(1).t()


def _sum_channels_last(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # A channel's values are C apart in memory, which no matmul takes in place: multiply and
    # reduce over the (B, HW, C) view, in memory order. Compiled code fuses the two.
    return (x.permute(0, 2, 3, 1).flatten(1, 2) * a.t().contiguous()).sum(1)


class _WeightedSum(torch.autograd.Function):
    """``y[b, c] = sum_p a[c, p] x[b, c, p]`` for ``x`` (B, C, H, W) and ``a`` (C, H*W).

    Written out because autograd's multiply-reduce writes ``x * a`` forward and ``g * x``
    beside ``g * a`` backward: three tensors the size of ``x``, where average pooling's
    backward writes one. Here the forward (NCHW) writes none, the backward writes ``g * a``
    (the input's gradient, as average pooling does) and reduces the weights' gradient over
    the batch as a batched matmul (NCHW) or a multiply-reduce (channels_last, see
    ``_sum_channels_last``). The product runs in ``x``'s dtype, also under autocast,
    which would otherwise run bmm in its own precision.
    """

    @staticmethod
    def forward(x: torch.Tensor, a: torch.Tensor, channels_last: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return _sum_channels_last(x, a) if channels_last else _sum_nchw(x, a)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - autograd.Function signature
        x, a, channels_last = inputs
        ctx.channels_last, ctx.shape = channels_last, x.shape
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, a if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001 - autograd.Function signature
        x, a = ctx.saved_tensors
        b, c, h, w = ctx.shape
        grad_x = grad_a = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.channels_last:
                g = g.unsqueeze(1)  # (B, 1, C) against the (B, HW, C) view
                if ctx.needs_input_grad[0]:
                    grad_x = (g * a.t().contiguous()).view(b, h, w, c).permute(0, 3, 1, 2)
                if ctx.needs_input_grad[1]:
                    grad_a = (x.permute(0, 2, 3, 1).flatten(1, 2) * g).sum(0).t()
            else:
                if ctx.needs_input_grad[0]:
                    grad_x = (g.unsqueeze(2) * a).view(b, c, h, w)
                if ctx.needs_input_grad[1]:
                    # (1 x B) @ (B x HW) per channel: x's rows in place again.
                    grad_a = torch.bmm(g.t().contiguous().unsqueeze(1), x.flatten(2).transpose(0, 1)).squeeze(1)
        return grad_x, grad_a, None


def _check_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"FlexPool expects a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"FlexPool weight must be 3-D (C, H, W), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"input has {x.shape[1]} channels but the FlexPool weight has {weight.shape[0]}")


def _pool(x: torch.Tensor, weight: torch.Tensor, pool: str, native: tuple[int, int], keepdim: bool) -> torch.Tensor:
    if isinstance(x, torch.fx.Proxy):
        # torch.fx.symbolic_trace: no shapes or layout to decide on; record the native-size NCHW form.
        y = _sum_nchw(x, _normalized_weight(weight, pool, native, native).to(x.dtype))
    else:
        a = _normalized_weight(weight, pool, native, (x.shape[-2], x.shape[-1])).to(x.dtype)
        y = _WeightedSum.apply(x, a, _channels_last(x))
    return y[:, :, None, None] if keepdim else y


def flex_pool2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    pool: str = "softmax",
    keepdim: bool = False,
) -> torch.Tensor:
    """Learned global weighted average pool: ``y[b, c] = sum_{h,w} A[c,h,w] x[b,c,h,w]``.

    Args:
        x: input (B, C, H', W'), NCHW or channels_last, float32/bfloat16/float16.
        weight: (C, H, W) logits (pool "softmax") or weights (pool "linear").
        pool: "softmax" (``A[c] = softmax(weight[c].flatten())``) or "linear" (``A = weight``).
        keepdim: return (B, C, 1, 1) when True, (B, C) when False.

    If (H', W') != (H, W) the weights are resampled, see ``FlexPool``. The output has
    the dtype of ``x``.
    """
    _check_pool(pool)
    _check_input(x, weight)
    return _pool(x, weight, pool, tuple(weight.shape[-2:]), keepdim)


# torch < 2.5 has no is_exporting; its export is strict (dynamo) only, which is_compiling sees.
_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)


def _compiling() -> bool:
    """True under torch.compile, torch.export (strict or not) or torch.jit.trace."""
    return torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()


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

    - pool "softmax" (default, the reference code's form): ``A[c] = softmax(weight[c].flatten())``;
    - pool "linear" (the paper's text): ``A = weight``; add ``regularizer()`` (times a
      coefficient) to the loss to keep each channel's weights summing to one.

    ``weight`` starts at the constant ``1 / (H * W)``, so at initialisation FlexPool is
    exactly global average pooling (equal to ``x.mean((2, 3))`` up to float rounding):
    converting a pretrained model preserves its function.

    Input size: ``weight`` is bound to the feature-map size ``size``. At that size the
    weights are used as they are. At any other size they are resampled bilinearly
    (``align_corners=False``): softmax FlexPool resamples the logits and then normalises,
    so constant logits stay uniform (still average pooling at init); linear FlexPool
    resamples the weights and rescales each channel so its sum is unchanged (a channel
    whose resampled sum is zero is scaled by the area ratio instead). A 1x1
    feature map makes FlexPool a no-op; this warns once per module.

    Dropout (``drop``, identity for p=0) is applied to the pooled vector in train mode.
    ``keepdim`` returns (B, C, 1, 1) instead of (B, C).

    The weights are normalised on every call (no cache); the weighted sum is one
    formulation per memory layout (NCHW, channels_last) with its own backward, see
    ``_WeightedSum``. It compiles with ``torch.compile(fullgraph=True)`` and exports with
    ``torch.export``.
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] | int,
        pool: str = "softmax",
        dropout: float = 0.0,
        keepdim: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.size = _pair(size)
        self.pool = _check_pool(pool)
        self.keepdim = keepdim
        self.weight = nn.Parameter(torch.empty(channels, *self.size))
        self.drop = nn.Dropout(dropout)
        self._warned_1x1 = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the weights to the constant ``1 / (H * W)``: exact average pooling."""
        with torch.no_grad():
            self.weight.fill_(1.0 / (self.size[0] * self.size[1]))

    def regularizer(self) -> torch.Tensor:
        """``sum_c (sum_{h,w} W[c,h,w] - 1)^2`` for pool "linear"; a zero tensor for "softmax"."""
        if self.pool != "linear":
            return self.weight.new_zeros(())
        return (self.weight.sum((1, 2)) - 1.0).square().sum()

    def pooling_weights(self, size: tuple[int, int] | int | None = None) -> torch.Tensor:
        """The weights ``A`` (C, H, W) this pool applies to an H x W map (default: its own
        size), in float32: each channel's softmax for pool "softmax", the weights resampled
        with their sum kept for "linear". Differentiable; ``y[b, c] = (A[c] * x[b, c]).sum()``."""
        size = self.size if size is None else _pair(size)
        return _normalized_weight(self.weight, self.pool, self.size, size).float().view(self.channels, *size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.keepdim)

    def _forward(self, x: torch.Tensor, keepdim: bool) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            _check_input(x, self.weight)
            if x.shape[-2] == 1 and x.shape[-1] == 1 and not self._warned_1x1 and not _compiling():
                self._warned_1x1 = True
                warnings.warn(
                    f"FlexPool got a 1x1 feature map (input {tuple(x.shape)}): it is a no-op at this "
                    f"input size (its weights are {self.size[0]}x{self.size[1]}); use a larger input",
                    UserWarning,
                    stacklevel=3,
                )
        y = _pool(x, self.weight, self.pool, self.size, keepdim)
        return self.drop(y) if self.training and self.drop.p > 0 else y

    def extra_repr(self) -> str:
        s = f"channels={self.channels}, size={self.size}, pool={self.pool!r}, dropout={self.drop.p}"
        if self.keepdim:
            s += ", keepdim=True"
        return s


class FlexPoolNHWC(FlexPool):
    """FlexPool on a channels-last ``(B, H, W, C)`` map (timm's ``input_fmt='NHWC'`` pools):
    returns ``(B, C)``, or ``(B, 1, 1, C)`` with ``keepdim``. The permute is a view, no copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward(x.permute(0, 3, 1, 2), keepdim=False)
        return y[:, None, None, :] if self.keepdim else y


class GlobalPool(_TimmPoolInterface, nn.Module):
    """A global pool that is not FlexPool, with FlexPool's interface, for ablation baselines.

    pool "avg": ``x.mean((2, 3))`` (what the source did; no parameters); "lse": timm's
    ``LsePlus2d`` (log-sum-exp, a learnable temperature between average and max pooling);
    "simpool": timm's ``SimPool2d`` (attention with the average as query). lse and simpool
    do not start out as average pooling, so a model converted with them changes its output.
    The kind is ``pool``; timm's module, where there is one, is ``timm_pool``.
    """

    def __init__(self, pool: str, channels: int, dropout: float = 0.0, keepdim: bool = False) -> None:
        super().__init__()
        if pool not in SPATIAL_BASELINES:
            raise ValueError(f"unknown baseline pool {pool!r} for a spatial map; choose one of "
                             f"{', '.join(SPATIAL_BASELINES)}")
        self.pool, self.channels, self.keepdim = pool, channels, keepdim
        self.timm_pool = None if pool == "avg" else _timm_pool(pool, channels)
        self.drop = nn.Dropout(dropout)

    def regularizer(self) -> torch.Tensor:
        return torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)) if self.timm_pool is None else self.timm_pool(x)
        if self.training and self.drop.p > 0:
            y = self.drop(y)
        return y[:, :, None, None] if self.keepdim else y

    def extra_repr(self) -> str:
        s = f"pool={self.pool!r}, channels={self.channels}, dropout={self.drop.p}"
        if self.keepdim:
            s += ", keepdim=True"
        return s


def _timm_pool(pool: str, channels: int) -> nn.Module:
    import timm.layers  # here, not at the top: importing timm registers checkpoints.timm_registry, which imports this

    name = {"lse": "LsePlus2d", "simpool": "SimPool2d"}[pool]
    cls = getattr(timm.layers, name, None)
    if cls is None:
        raise ValueError(f"pool {pool!r} needs timm's {name}, which this timm ({timm.__version__}) does not have; "
                         "upgrade timm")
    return cls(flatten=True) if pool == "lse" else cls(channels)


def make_pool(pool: str, channels: int, size: tuple[int, int] | int, dropout: float = 0.0,
              keepdim: bool = False) -> nn.Module:
    """FlexPool for pools "softmax" and "linear", else the baseline ``GlobalPool``."""
    if pool in FLEXPOOL_KINDS:
        return FlexPool(channels, size, pool=pool, dropout=dropout, keepdim=keepdim)
    return GlobalPool(pool, channels, dropout=dropout, keepdim=keepdim)


