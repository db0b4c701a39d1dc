"""Token FlexPool: FlexPool over a transformer's (B, N, C) token sequence.

A vision transformer or MLP-Mixer head reduces its tokens to one vector per image, either
as the mean over a range of tokens (timm ``global_pool='avg'``: the patch tokens, or all of
them) or as the class token (``global_pool='token'``). ``TokenFlexPool`` replaces that
reduction with a learned weight per channel and token, starting out exactly equal to it.

Public names: ``TokenFlexPool`` (the module), ``TokenPool`` (the fixed reductions, the
ablation baselines "avg" and "token") and ``flex_pool_tokens`` (the weighted sum, given the
pooling weights). The kind is ``pool`` ("softmax" or "linear", as for FlexPool).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import FLEXPOOL_KINDS

__all__ = ["TokenFlexPool", "TokenPool", "flex_pool_tokens"]

START_KINDS = ("mean", "token")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_start(start: object, num_tokens: int, num_prefix: int) -> tuple:
    """``start`` as ``("mean", first, last)`` or ``("token", index)`` with ints, or ValueError.

    Also takes timm's ``global_pool`` names: "avg" (the mean over the patch tokens, those
    after the ``num_prefix`` prefix tokens) and "token" (the class token, token 0).
    """
    if start == "avg":
        start = ("mean", num_prefix, num_tokens)
    elif start == "token":
        start = ("token", 0)
    if not isinstance(start, (tuple, list)) or not start or start[0] not in START_KINDS:
        raise ValueError(f"start must be 'avg', 'token', ('mean', first, last) or ('token', index), got {start!r}")
    kind, *args = start
    if kind == "mean":
        if len(args) not in (1, 2):
            raise ValueError(f"a mean start is ('mean', first, last), got {start!r}")
        first = args[0]
        last = num_tokens if len(args) == 1 or args[1] is None else args[1]
        if not (_is_int(first) and _is_int(last) and 0 <= first < last <= num_tokens):
            raise ValueError(f"a mean start needs ints 0 <= first < last <= num_tokens={num_tokens}, got {start!r}")
        return ("mean", first, last)
    if len(args) != 1 or not _is_int(args[0]) or not 0 <= args[0] < num_tokens:
        raise ValueError(f"a token start is ('token', index) with 0 <= index < num_tokens={num_tokens}, got {start!r}")
    return ("token", args[0])


def _check_grid(grid: object) -> tuple[int, int]:
    pair = tuple(grid) if isinstance(grid, (tuple, list)) else ()
    if len(pair) != 2 or not all(_is_int(s) and s > 0 for s in pair):
        raise ValueError(f"grid must be a pair of positive ints (Hp, Wp), got {grid!r}")
    return pair  # type: ignore[return-value]


def _token_weights(
    weight: torch.Tensor,
    gamma: torch.Tensor | None,
    pool: str,
    index: int,
    prefix: int,
    native: tuple[int, int] | None,
    grid: tuple[int, int] | None,
) -> torch.Tensor:
    """Pooling weights ``A`` over the read tokens at patch grid ``grid``, as (C, n) in float32
    (float64 for float64 weights).

    ``weight`` holds ``prefix`` prefix columns then, when ``native`` is a grid, the patch
    columns in row-major order. Sizes come in as ints so that this also runs on FX proxies.
    At another grid the patch columns are resampled bilinearly and the prefix columns kept;
    softmax then normalises over all read tokens, linear rescales the whole channel to keep
    its sum. Both keep the ratio of every prefix weight to the (resampled) patch weights, so
    equal weights stay an exact mean and a one-hot stays one-hot at every grid.
    ``gamma`` (softmax class-token start): ``A = e + gamma * (softmax(weight) - e)``, ``e``
    the one-hot on token ``index``.
    """
    wide = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(wide)
    resized = grid is not None and grid != native
    if resized:
        patches = w[:, prefix:].reshape(1, -1, native[0], native[1])
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False).flatten(2)[0]
        resampled = torch.cat([w[:, :prefix], patches], 1)
    else:
        resampled = w
    if pool == "softmax":
        a = resampled.softmax(-1)
        if gamma is None:
            return a
        # e + gamma (a - e), written as a column update so no one-hot tensor is built
        # (its size would depend on the input, and FX cannot build it from a Proxy).
        g = gamma.to(wide)[:, None]
        scaled = g * a
        return torch.cat([scaled[:, :index], scaled[:, index : index + 1] + (1.0 - g), scaled[:, index + 1 :]], 1)
    if not resized:
        return w
    old_sum = w.sum(-1, keepdim=True)
    new_sum = resampled.sum(-1, keepdim=True)
    # Where the resampled sum is ~0 the ratio means nothing: fall back to the token-count
    # ratio, which is exact for constant weights (as FlexPool falls back to the area ratio).
    count = (prefix + native[0] * native[1]) / (prefix + grid[0] * grid[1])
    ok = new_sum.abs() > torch.finfo(torch.float32).tiny
    return resampled * torch.where(ok, old_sum / torch.where(ok, new_sum, 1.0), count)


def _weighted_sum(x: torch.Tensor, a: torch.Tensor, first: int, count: int) -> torch.Tensor:
    # Multiply-reduce over the (B, n, C) slice, in memory order: faster than einsum/bmm, which
    # copy x to put C first, and one fused kernel under torch.compile. A contiguous (n, C)
    # weight halves the eager time against the transposed view.
    return (x[:, first : first + count] * a.t().contiguous().to(x.dtype)).sum(1)


def flex_pool_tokens(x: torch.Tensor, weights: torch.Tensor, first: int = 0) -> torch.Tensor:
    """``y[b, c] = sum_t weights[c, t] * x[b, first + t, c]``: a weighted sum over tokens.

    Args:
        x: tokens (B, N, C), float32/bfloat16/float16.
        weights: pooling weights (C, n) with ``first + n <= N``, e.g. from
            ``TokenFlexPool.pooling_weights()`` (n = N, first = 0); any dtype.
        first: the first token read.

    The sum runs in ``x``'s dtype (autocast off) and the output has it.
    """
    if x.dim() != 3 or weights.dim() != 2 or weights.shape[0] != x.shape[2] or first + weights.shape[1] > x.shape[1]:
        raise ValueError(
            f"flex_pool_tokens needs x (B, N, C) and weights (C, n) with first + n <= N, got x {tuple(x.shape)}, "
            f"weights {tuple(weights.shape)}, first={first}"
        )
    with torch.autocast(x.device.type, enabled=False):
        return _weighted_sum(x, weights, first, weights.shape[1])


class TokenFlexPool(nn.Module):
    """FlexPool over tokens: ``y[b, c] = sum_t A[c, t] * x[b, t, c]`` for ``x`` (B, N, C).

    Args:
        channels: C.
        num_tokens: N, the number of tokens the weights are built for.
        start: the source's reduction, which the pool starts out equal to:
            ``("mean", first, last)`` (the mean over ``x[:, first:last]``; ``last`` None is N)
            or ``("token", index)`` (``x[:, index]``); or timm's names "avg" (the mean over
            the patch tokens, ``("mean", num_prefix, N)``) and "token" (``("token", 0)``).
        grid: (Hp, Wp) when tokens ``num_prefix..N`` are an Hp x Wp patch grid in row-major
            order; the patch weights are then resampled for other input sizes and can be drawn
            (``patch_weights``). None: N is fixed.
        num_prefix: the prefix tokens (class, register, distillation) before the patches.
        pool: "softmax" or "linear", see below.
        dropout: dropout on the pooled vector, in train mode only.

    Read tokens: a mean start reads (and weighs) exactly its range; a class-token start reads
    all N tokens, so it can learn to use the patches. ``weight`` is (C, number read).

    - Mean start: softmax ``A[c] = softmax(weight[c])`` with ``weight`` zero; linear ``A = weight``
      starting at ``1/n``. Equal weights: the mean, to float rounding.
    - Class-token start, softmax: ``A[c] = e + gamma[c] * (softmax(weight[c]) - e)``, ``e`` the
      one-hot on the class token, ``gamma`` (C,) unconstrained and zero, ``weight`` zero. ``A`` is
      exactly ``e`` at the start and sums to one always (a convex mix for gamma in [0, 1]). A softmax
      with all weight on one token would be saturated and barely learn; here ``dL/dgamma[c] =
      sum_b g[b, c] (mean_t x[b, t, c] - x[b, index, c])`` is nonzero from the first step, and
      ``weight`` learns once gamma has moved.
    - Class-token start, linear: ``A = weight`` starting at the one-hot.

    For "linear" add ``regularizer()`` (times a coefficient) to the loss to keep each channel's
    sum at one; it is zero for "softmax", whose weights always sum to one.

    Another token count needs a grid: ``forward(x, grid=(Hp', Wp'))``, or without ``grid`` the
    grid with the native aspect ratio is inferred (a square grid stays square). The prefix
    weights keep their values and the patch weights are resampled bilinearly (softmax: the
    logits, then normalised over all read tokens; linear: the weights, then the channel rescaled
    to keep its sum), so every start still equals its source at any grid. Without a grid a
    different N is a ValueError.

    The weights are computed in float32 on every call, the weighted sum in the input's dtype.
    Works under ``torch.compile(fullgraph=True)`` and ``torch.fx`` tracing (as a leaf or traced
    through, at the native size).
    """

    def __init__(
        self,
        channels: int,
        num_tokens: int,
        start: str | tuple = "avg",
        *,
        grid: tuple[int, int] | None = None,
        num_prefix: int = 0,
        pool: str = "softmax",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not _is_int(channels) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not _is_int(num_tokens) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        if not _is_int(num_prefix) or not 0 <= num_prefix < num_tokens:
            raise ValueError(f"num_prefix must be an int in [0, num_tokens={num_tokens}), got {num_prefix!r}")
        if pool not in FLEXPOOL_KINDS:
            kinds = ", ".join(map(repr, FLEXPOOL_KINDS))
            raise ValueError(f"unknown TokenFlexPool pool {pool!r}; choose one of {kinds}")
        self.channels, self.num_tokens, self.num_prefix, self.pool = channels, num_tokens, num_prefix, pool
        self.start = _parse_start(start, num_tokens, num_prefix)
        self.grid = None if grid is None else _check_grid(grid)
        if self.grid is not None:
            self._check_grid_fits()
        first, last = self._read_range(num_tokens)
        self.weight = nn.Parameter(torch.empty(channels, last - first))
        has_gamma = self.start[0] == "token" and pool == "softmax"
        self.gamma = nn.Parameter(torch.empty(channels)) if has_gamma else None
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def _check_grid_fits(self) -> None:
        gh, gw = self.grid
        if self.num_prefix + gh * gw != self.num_tokens:
            raise ValueError(f"num_prefix={self.num_prefix} plus grid {self.grid} ({gh * gw} patches) "
                             f"is not num_tokens={self.num_tokens}")
        # The read tokens must be some prefix tokens then the whole grid, so that the grid
        # part can be resampled and the rest kept.
        if self.start[0] == "mean" and (self.start[1] > self.num_prefix or self.start[2] != self.num_tokens):
            raise ValueError(f"with a grid a mean start must read the whole grid: first <= num_prefix="
                             f"{self.num_prefix} and last = num_tokens={self.num_tokens}, got {self.start!r}")
        if self.start[0] == "token" and self.start[1] >= self.num_prefix:
            raise ValueError(f"with a grid a token start must read a prefix token (index < num_prefix="
                             f"{self.num_prefix}), got {self.start!r}")

    def _read_range(self, num_tokens: int) -> tuple[int, int]:
        """The tokens read, ``[first, last)``, at ``num_tokens`` tokens."""
        if self.start[0] == "token":
            return 0, num_tokens
        return self.start[1], (self.start[2] if num_tokens == self.num_tokens else num_tokens)

    def _grid_for(self, num_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        """The patch grid at ``num_tokens`` tokens: ``grid`` if given, else inferred."""
        if grid is not None:
            if self.grid is None:
                raise ValueError("this TokenFlexPool has no patch grid (built with grid=None); it cannot take one")
            grid = _check_grid(grid)
            if self.num_prefix + grid[0] * grid[1] != num_tokens:
                raise ValueError(f"grid {grid} plus {self.num_prefix} prefix tokens is not {num_tokens} tokens")
            return grid
        if num_tokens == self.num_tokens:
            return self.grid
        if self.grid is None:
            raise ValueError(f"TokenFlexPool was built for {self.num_tokens} tokens and has no patch grid to "
                             f"resample its weights on (grid=None); got {num_tokens} tokens")
        patches, (gh, gw) = num_tokens - self.num_prefix, self.grid
        h = round(math.sqrt(patches * gh / gw)) if patches > 0 else 0
        if h <= 0 or patches % h or h * gw != (patches // h) * gh:
            raise ValueError(f"cannot tell the patch grid of {num_tokens} tokens ({patches} patches) from the "
                             f"native grid {self.grid}; pass grid=(Hp, Wp)")
        return h, patches // h

    def reset_parameters(self) -> None:
        """Start equal to the source: equal weights for a mean, the one-hot (or gamma 0) for a token."""
        with torch.no_grad():
            if self.pool == "softmax":
                self.weight.zero_()
            elif self.start[0] == "mean":
                self.weight.fill_(1.0 / self.weight.shape[1])
            else:
                self.weight.zero_()
                self.weight[:, self.start[1]] = 1.0
            if self.gamma is not None:
                self.gamma.zero_()

    def regularizer(self) -> torch.Tensor:
        """``sum_c (sum_t W[c, t] - 1)^2`` for pool "linear"; a zero tensor for "softmax"."""
        if self.pool != "linear":
            return self.weight.new_zeros(())
        return (self.weight.sum(1) - 1.0).square().sum()

    def _weights(self, grid: tuple[int, int] | None) -> torch.Tensor:
        index = self.start[1] if self.start[0] == "token" else 0
        prefix = self.num_prefix - self._read_range(self.num_tokens)[0]
        return _token_weights(self.weight, self.gamma, self.pool, index, prefix, self.grid, grid)

    def pooling_weights(self, num_tokens: int | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The weights ``A`` (C, N) this pool applies to N tokens (default: its own N; or give
        the ``grid``), float32 and differentiable, zero on tokens it does not read:
        ``y[b, c] = (A[c] * x[b, :, c]).sum()``."""
        if num_tokens is None:
            num_tokens = self.num_tokens if grid is None else self.num_prefix + math.prod(_check_grid(grid))
        grid = self._grid_for(num_tokens, grid)
        first, last = self._read_range(num_tokens)
        return F.pad(self._weights(grid).float(), (first, num_tokens - last))

    def patch_weights(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The weights on the patch tokens as (C, Hp, Wp) images (default: the native grid)."""
        if self.grid is None:
            raise ValueError("this TokenFlexPool has no patch grid (built with grid=None)")
        grid = self.grid if grid is None else _check_grid(grid)
        return self.pooling_weights(grid=grid)[:, self.num_prefix :].reshape(self.channels, *grid)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            # torch.fx.symbolic_trace: no shapes to decide on; record the native-size form.
            first, last = self._read_range(self.num_tokens)
            y = _weighted_sum(x, self._weights(self.grid), first, last - first)
        else:
            if x.dim() != 3:
                raise ValueError(f"TokenFlexPool expects a 3-D (B, N, C) input, got shape {tuple(x.shape)}")
            if x.shape[2] != self.channels:
                raise ValueError(f"input {tuple(x.shape)} has {x.shape[2]} channels (last dim) but the "
                                 f"TokenFlexPool has {self.channels}")
            first, last = self._read_range(x.shape[1])
            a = self._weights(self._grid_for(x.shape[1], grid))
            # The product runs in x's dtype, also under autocast (which would run sum in float32).
            with torch.autocast(x.device.type, enabled=False):
                y = _weighted_sum(x, a, first, last - first)
        return self.drop(y) if self.training and self.drop.p > 0 else y

    def extra_repr(self) -> str:
        s = f"channels={self.channels}, num_tokens={self.num_tokens}, start={self.start!r}"
        if self.grid is not None:
            s += f", grid={self.grid}"
        if self.num_prefix:
            s += f", num_prefix={self.num_prefix}"
        return s + f", pool={self.pool!r}, dropout={self.drop.p}"


class TokenPool(nn.Module):
    """A fixed token reduction, the baseline of an ablation: ``("mean", first, last)`` (the
    mean over those tokens; ``last`` follows the sequence when it is the whole of it) or
    ``("token", index)`` (one token, e.g. the class token). No parameters; dropout on the
    output in training, as FlexPool's."""

    def __init__(self, num_tokens: int, start: str | tuple, *, num_prefix: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_tokens, self.num_prefix = num_tokens, num_prefix
        self.start = _parse_start(start, num_tokens, num_prefix)
        self.drop = nn.Dropout(dropout)

    def regularizer(self) -> torch.Tensor:
        return torch.zeros(())

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if self.start[0] == "token":
            y = x[:, self.start[1]]
        else:
            first, last = self.start[1], self.start[2]
            y = x[:, first:].mean(1) if last == self.num_tokens else x[:, first:last].mean(1)
        return self.drop(y) if self.training and self.drop.p > 0 else y

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, start={self.start!r}, dropout={self.drop.p}"
