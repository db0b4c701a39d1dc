"""Shape propagation that also notes the reductions whose value is the mean over positions.

Like torch.fx's ``ShapeProp`` it runs a graph once and writes ``node.meta['tensor_meta']``,
changing nothing else; on the way it checks every node that turns a ``(B, C, H, W)`` map
(or a channels-last ``(B, H, W, C)`` one) into ``(B, C)`` or ``(B, C, 1, 1)`` against the
mean over positions, whatever API computed it; and every node that turns a ``(B, N, C)`` token
sequence into ``(B, C)`` against one token's value and the mean over a range of tokens.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .trace import node_shape

_FLATTEN_TARGETS = ("flatten", torch.flatten)


@dataclass(frozen=True)
class TensorMeta:
    shape: torch.Size
    dtype: torch.dtype


def _tensor_meta(value):
    """What shape propagation records: tensor metadata, or a tuple of it for tuples of tensors."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(value.shape, value.dtype)
    if isinstance(value, (tuple, list)):
        metas = tuple(_tensor_meta(v) for v in value)
        return metas if any(m is not None for m in metas) else None
    return None


class PoolFinder(fx.Interpreter):
    """Shape propagation (``node.meta['tensor_meta']``, as torch.fx's ShapeProp writes it)
    that also checks each candidate reduction against the mean."""

    def __init__(self, gm: fx.GraphModule, img_size):
        super().__init__(gm)
        self.img_size = img_size
        self.candidates: dict[str, tuple[str, str, bool, str]] = {}  # node -> (input, kind, keepdim, layout)
        self.token_starts: dict[str, tuple] = {}  # token pools: node -> ("mean", first, last) or ("token", i)
        self._slices: dict[str, tuple[fx.Node, torch.Tensor]] = {}  # token slices: node -> (sliced node, value)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        meta = _tensor_meta(result)
        if meta is not None:
            n.meta["tensor_meta"] = meta
        if isinstance(result, torch.Tensor) and n.op != "placeholder":
            self._keep_token_slice(n, result)
            found = self._check_pool(n, result)
            if found is not None:
                self.candidates[n.name] = found
        return result

    def _keep_token_slice(self, n: fx.Node, out: torch.Tensor) -> None:
        """``x[:, a:b]`` of a token sequence: the sequence is kept, since a mean of the slice
        may run after the sequence's value is freed."""
        if n.target is operator.getitem and out.dim() == 3 and isinstance(n.args[0], fx.Node):
            value = self.env.get(n.args[0])
            if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[0::2] == out.shape[0::2]:
                self._slices[n.name] = (n.args[0], value)

    def _check_pool(self, n: fx.Node, out: torch.Tensor):
        if not n.args or not isinstance(n.args[0], fx.Node) or out.dim() not in (2, 4):
            return None
        if n.op == "call_module" and any(True for _ in self.module.get_submodule(n.target).parameters()):
            return None  # a learned layer (conv, linear), not a pool
        source = n.args[0]
        value = self.env.get(source)
        if not isinstance(value, torch.Tensor):
            return None
        found = self._check_tokens(n, source, value, out) if out.dim() == 2 and value.dim() == 3 else None
        if found is not None:
            return found
        if value.dim() == 3 and _is_flatten(source):  # x.flatten(2).mean(-1)
            source = source.args[0]  # its value may be freed already; its shape is in meta
            shape = node_shape(source)
            value = value.unflatten(2, shape[2:]) if shape is not None and len(shape) == 4 else value
        if value.dim() != 4:
            return None
        b = value.shape[0]
        if value.shape[2] * value.shape[3] > 1 and tuple(out.shape) in ((b, value.shape[1]), (b, value.shape[1], 1, 1)):
            layout, dims = "nchw", (2, 3)
        elif (is_map(int(value.shape[1]), int(value.shape[2]), self.img_size)
              and tuple(out.shape) in ((b, value.shape[3]), (b, 1, 1, value.shape[3]))):
            layout, dims = "nhwc", (1, 2)  # a channels-last block: x.mean((1, 2)) on (B, H, W, C)
        else:
            return None
        pooled = out.detach().float().reshape(b, -1)
        mean = value.detach().float().mean(dims)
        kind = "avg" if torch.allclose(pooled, mean, rtol=1e-4, atol=1e-5) else "other"
        return source.name, kind, out.dim() == 4, layout


    def _check_tokens(self, n: fx.Node, source: fx.Node, value: torch.Tensor, out: torch.Tensor):
        """A token pool: ``(B, N, C)`` to ``(B, C)`` as one token's value or the mean over a
        contiguous range of tokens (found as a slice of the sequence), decided from values."""
        b, m, c = value.shape
        if tuple(out.shape) != (b, c):
            return None
        if m == 1:  # the one output token of an attention pool (a learned query over the sequence)
            return (source.name, "attention", False, "tokens") if n.target is operator.getitem else None
        pooled, tokens = out.detach().float(), value.detach().float()
        scale = 1e-5 + 1e-4 * pooled.abs().amax().item()
        same = ((tokens - pooled[:, None]).abs().amax(dim=(0, 2)) <= scale).nonzero()
        if n.target is operator.getitem and len(same):
            self.token_starts[n.name] = ("token", int(same[0]))
            return source.name, "token", False, "tokens"
        if not torch.allclose(pooled, tokens.mean(1), rtol=1e-4, atol=1e-5):
            return source.name, "other", False, "tokens"  # a max, a sum, an attention pool...
        if source.name in self._slices:  # the mean of x[:, a:b]: a range of the whole sequence
            whole, full = self._slices[source.name]
            for first in range(full.shape[1] - m + 1):
                if torch.equal(full[:, first:first + m], value):
                    self.token_starts[n.name] = ("mean", first, first + m)
                    return whole.name, "avg", False, "tokens"
        self.token_starts[n.name] = ("mean", 0, m)
        return source.name, "avg", False, "tokens"


def _is_flatten(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return node.target in _FLATTEN_TARGETS and start == 2


def is_map(h: int, w: int, img_size) -> bool:
    """True when (h, w) can be the spatial size of a map of an ``img_size`` input.

    Both sides must be reduced by the same factor; this tells the (H, W) of an NCHW
    tensor from the (W, C) of a channels-last one that a block permuted to.
    """
    return h * w > 1 and abs(h * img_size[1] - w * img_size[0]) <= max(img_size)
