"""Tests for flexsurgeon.layers: FlexPool, flex_pool2d and SACHead."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flexsurgeon.layers.kinds import FLEXPOOL_KINDS
from flexsurgeon.layers.pools import FlexPool, flex_pool2d
from flexsurgeon.layers.sac_head import SACHead

LAYOUTS = ("nchw", "channels_last")


def _input(shape=(3, 5, 4, 6), layout="nchw", dtype=torch.float32, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    return x


def _perturb(pool: FlexPool, seed: int = 1) -> None:
    with torch.no_grad():
        pool.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))


def _reference(x: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Naive definition: y[b, c] = sum_{h,w} A[c,h,w] x[b,c,h,w]."""
    c, h, w = weight.shape
    a = weight.flatten(1).softmax(-1).view(c, h, w) if kind == "softmax" else weight
    return (a * x).sum((2, 3))


@pytest.mark.parametrize("kind", FLEXPOOL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("keepdim", [False, True])
def test_equals_mean_at_init_float32(kind, layout, keepdim):
    pool = FlexPool(5, (4, 6), pool=kind, keepdim=keepdim).eval()
    x = _input(layout=layout)
    expected = x.mean((2, 3), keepdim=keepdim)
    for grad in (True, False):  # uncached and cached paths
        with torch.set_grad_enabled(grad):
            y = pool(x)
        assert y.shape == expected.shape == ((3, 5, 1, 1) if keepdim else (3, 5))
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", FLEXPOOL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_mean_at_init_low_precision(dtype, kind, layout):
    pool = FlexPool(5, (4, 6), pool=kind).eval()
    x = _input(layout=layout, dtype=dtype)
    with torch.no_grad():
        y = pool(x)
    assert y.dtype == dtype
    expected = x.float().mean((2, 3))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=tol)


def test_init_weight_value_and_name():
    pool = FlexPool(4, (2, 5))
    assert [n for n, _ in pool.named_parameters()] == ["weight"]
    assert pool.weight.shape == (4, 2, 5)
    assert torch.all(pool.weight == 1.0 / 10)
    assert FlexPool(3, 7).weight.shape == (3, 7, 7)


@pytest.mark.parametrize("kind", FLEXPOOL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(8, 9), (2, 3), (4, 6)])
def test_other_input_size_is_mean_at_init(kind, layout, size):
    pool = FlexPool(5, (4, 6), pool=kind).eval()
    x = _input((2, 5, *size), layout=layout)
    torch.testing.assert_close(pool(x), x.mean((2, 3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", FLEXPOOL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_trained_weight_matches_naive_reference_at_native_size(kind, layout):
    pool = FlexPool(5, (4, 6), pool=kind).eval()
    _perturb(pool)
    x = _input(layout=layout)
    expected = _reference(x, pool.weight.detach(), kind)
    assert not torch.allclose(expected, x.mean((2, 3)), atol=1e-3)  # the weights matter
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flex_pool2d(x, pool.weight.detach(), pool=kind), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FLEXPOOL_KINDS)
def test_pooling_weights_are_what_the_pool_applies(kind):
    pool = FlexPool(5, (4, 6), pool=kind).eval()
    torch.testing.assert_close(pool.pooling_weights(), torch.full((5, 4, 6), 1 / 24))  # average pooling
    _perturb(pool)
    for size in ((4, 6), (7, 3)):
        a = pool.pooling_weights(size)
        assert a.shape == (5, *size) and a.dtype == torch.float32
        x = _input((2, 5, *size))
        torch.testing.assert_close(pool(x), (x * a).sum((2, 3)), rtol=1e-5, atol=1e-6)
    if kind == "softmax":
        torch.testing.assert_close(pool.pooling_weights().sum((1, 2)), torch.ones(5))
    assert pool.pooling_weights().requires_grad  # a penalty on the weights can train them


def test_softmax_resampling_follows_bilinear_logits():
    pool = FlexPool(5, (4, 6)).eval()
    _perturb(pool)
    x = _input((2, 5, 8, 12))
    resample = nn.functional.interpolate
    logits = resample(pool.weight.detach()[None], size=(8, 12), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pool(x), _reference(x, logits, "softmax"), rtol=1e-5, atol=1e-6)


def test_linear_resampling_preserves_channel_sums():
    pool = FlexPool(5, (4, 6), pool="linear").eval()
    _perturb(pool)
    with torch.no_grad():
        pool.weight.add_(1.0)  # keep channel sums away from zero
    ones = torch.ones(1, 5, 7, 3)
    # With a constant input the output is the sum of the (resampled) weights.
    torch.testing.assert_close(pool(ones)[0], pool.weight.detach().sum((1, 2)), rtol=1e-5, atol=1e-5)
    x = _input((2, 5, 7, 3))
    w = nn.functional.interpolate(pool.weight.detach()[None], size=(7, 3), mode="bilinear", align_corners=False)[0]
    w = w * (pool.weight.detach().sum((1, 2)) / w.sum((1, 2)))[:, None, None]
    torch.testing.assert_close(pool(x), _reference(x, w, "linear"), rtol=1e-5, atol=1e-5)


def test_linear_regularizer_value_and_gradient():
    pool = FlexPool(2, (1, 2), pool="linear")
    with torch.no_grad():
        pool.weight.copy_(torch.tensor([[[0.25, 0.25]], [[1.0, 2.0]]]))
    reg = pool.regularizer()
    # channel sums 0.5 and 3.0: (0.5 - 1)^2 + (3 - 1)^2 = 4.25
    torch.testing.assert_close(reg, torch.tensor(4.25))
    reg.backward()
    # d/dW[c,h,w] = 2 (sum_c - 1)
    torch.testing.assert_close(pool.weight.grad, torch.tensor([[[-1.0, -1.0]], [[4.0, 4.0]]]))


def test_softmax_regularizer_is_zero():
    pool = FlexPool(3, 2)
    _perturb(pool)
    assert pool.regularizer().item() == 0.0


def test_sac_head():
    head = SACHead(5, (4, 6), num_classes=7, pool="linear", dropout=0.0).eval()
    assert isinstance(head.pool, FlexPool) and isinstance(head.fc, nn.Linear)
    assert [n for n, _ in head.named_parameters()] == ["pool.weight", "fc.weight", "fc.bias"]
    x = _input()
    torch.testing.assert_close(head(x), head.fc(x.mean((2, 3))), rtol=0, atol=1e-5)
    with torch.no_grad():
        head.pool.weight.mul_(2.0)
    torch.testing.assert_close(head.regularizer(), head.pool.regularizer())
    assert head.regularizer().item() > 0


def _plain_weights(weight: torch.Tensor, kind: str, size: tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) written out from the method's definition, independent of flexsurgeon.layers."""
    c, h, w = weight.shape
    resampled = weight if size == (h, w) else nn.functional.interpolate(
        weight[None], size=size, mode="bilinear", align_corners=False)[0]
    if kind == "softmax":
        return resampled.flatten(1).softmax(-1).view(c, *size)
    return resampled * (weight.sum((1, 2)) / resampled.sum((1, 2)))[:, None, None]


@pytest.mark.parametrize("kind", FLEXPOOL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(4, 6), (5, 3)], ids=["native", "resampled"])
def test_forward_and_gradients_match_plain_reference_in_float64(kind, layout, size):
    x = _input((2, 3, *size), layout=layout, dtype=torch.float64).requires_grad_(True)
    weight = (torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 1.0)
    weight.requires_grad_(True)
    y = flex_pool2d(x, weight, pool=kind)
    expected = (x * _plain_weights(weight, kind, size)).sum((2, 3))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, weight), g)
    expected_grads = torch.autograd.grad(expected, (x, weight), g)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: flex_pool2d(x, w, pool=kind), (x, weight))
    # Only one of the two inputs trainable: a frozen pool still passes the gradient on.
    assert torch.autograd.gradcheck(lambda x: flex_pool2d(x, weight.detach(), pool=kind), (x,))
    assert torch.autograd.gradcheck(lambda w: flex_pool2d(x.detach(), w, pool=kind), (weight,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_forward_is_close_to_float32(dtype, layout):
    pool = FlexPool(8, (4, 6)).eval()
    _perturb(pool)
    x = _input((4, 8, 4, 6), layout=layout)
    expected = pool(x)
    y = pool(x.to(dtype))
    assert y.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_under_autocast_the_product_runs_in_the_input_dtype(layout):
    pool = FlexPool(8, (4, 6)).train()
    _perturb(pool)
    x = _input((4, 8, 4, 6), layout=layout)
    expected = pool(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pool(x)  # a float32 map stays float32, as with a plain multiply-reduce
        y16 = pool(x.bfloat16())
    assert y.dtype == torch.float32 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y16.float(), expected, rtol=3e-2, atol=3e-2)
    y16.float().sum().backward()
    assert pool.weight.grad.dtype == torch.float32 and torch.isfinite(pool.weight.grad).all()


class _FullSizeWrites(TorchDispatchMode):
    """Counts the tensors of at least ``numel`` elements that ops write to new memory."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in (*args, *(kwargs or {}).values())
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_writes_no_more_full_size_tensors_than_average_pooling(layout):
    x = _input((4, 8, 6, 6), layout=layout).requires_grad_(True)
    pool = FlexPool(8, (6, 6)).train()
    _perturb(pool)
    g = torch.randn(4, 8)
    writes = {}
    for name, fn in {"mean": lambda: torch.autograd.grad(x.mean((2, 3)), (x,), g),
                     "flexpool": lambda: torch.autograd.grad(pool(x), (x, pool.weight), g)}.items():
        with _FullSizeWrites(x.numel()) as counter:
            fn()
        writes[name] = counter.count
    assert writes["mean"] == 1  # its backward: the input's gradient
    # NCHW: the input's gradient only. channels_last: also the forward's product and the
    # weights' gradient's product, which no public op reduces without writing out.
    assert writes["flexpool"] == (1 if layout == "nchw" else 3)


def test_1x1_feature_map_warns_once():
    pool = FlexPool(5, (4, 6))
    x = _input((2, 5, 1, 1))
    with pytest.warns(UserWarning, match="1x1"):
        y = pool(x)
    torch.testing.assert_close(y, x.flatten(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool(x)  # only once per module
        pool(_input((2, 5, 4, 6)))  # never at other sizes


def test_weight_updates_show_in_eval():
    pool = FlexPool(5, (4, 6), pool="linear")
    x = _input()
    opt = torch.optim.SGD(pool.parameters(), lr=1.0)
    with torch.inference_mode():
        y0 = pool.eval()(x)
    pool.train()(x).square().sum().backward()
    opt.step()
    with torch.inference_mode():
        y1 = pool.eval()(x)
    assert not torch.allclose(y0, y1, atol=1e-4)
    torch.testing.assert_close(y1, _reference(x, pool.weight.detach(), "linear"), rtol=1e-5, atol=1e-6)
    pool.load_state_dict(FlexPool(5, (4, 6), pool="linear").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pool(x), x.mean((2, 3)), rtol=0, atol=1e-6)


def test_state_dict_holds_only_the_weights_and_the_pool_pickles():
    pool = FlexPool(5, (4, 6)).eval()
    _perturb(pool)
    assert list(pool.state_dict()) == ["weight"]
    assert list(SACHead(5, 4, 3).state_dict()) == ["pool.weight", "fc.weight", "fc.bias"]
    x = _input()
    for copied in (pickle.loads(pickle.dumps(pool)), copy.deepcopy(pool)):
        torch.testing.assert_close(copied(x), pool(x), rtol=0, atol=0)


def test_dropout_only_in_train():
    pool = FlexPool(64, 3, dropout=0.5)
    assert isinstance(pool.drop, nn.Dropout) and pool.drop.p == 0.5
    x = _input((4, 64, 3, 3))
    torch.manual_seed(0)
    y = pool.train()(x)
    mean = x.mean((2, 3))
    zeros = y == 0
    assert zeros.any() and not zeros.all()
    torch.testing.assert_close(y[~zeros], 2 * mean[~zeros], rtol=0, atol=1e-5)  # kept values scaled by 1/(1-p)
    torch.testing.assert_close(pool.eval()(x), mean, rtol=0, atol=1e-6)
    assert isinstance(FlexPool(4, 3).drop, nn.Dropout) and FlexPool(4, 3).drop.p == 0.0


def test_extra_repr():
    r = repr(FlexPool(8, (3, 4), pool="linear", dropout=0.25))
    for part in ("channels=8", "size=(3, 4)", "pool='linear'", "dropout=0.25"):
        assert part in r


def test_invalid_pool_names_choices():
    with pytest.raises(ValueError, match="'softmax', 'linear'") as e:
        FlexPool(4, 3, pool="max")
    assert "'max'" in str(e.value)
    with pytest.raises(ValueError, match="'softmax', 'linear'"):
        flex_pool2d(_input(), torch.zeros(5, 4, 6), pool="mean")


def test_bad_shapes_raise():
    pool = FlexPool(5, (4, 6))
    with pytest.raises(ValueError, match="channels"):
        pool(_input((2, 4, 4, 6)))
    with pytest.raises(ValueError, match="4-D"):
        pool(torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="size"):
        FlexPool(5, (4, 0))


def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FlexPool(8, (6, 5)), nn.Linear(8, 4)).eval()
    _perturb(net[1])
    return net


def _net_input(layout: str, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


# aot_eager traces what inductor traces (one graph, forward and backward) without generating
# C++: inductor's first compile takes ~30 s on 2 CPU cores, so it is in the slow set
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph_matches_eager_forward_and_backward(layout, backend, compiled_matches_eager):
    net = _tiny_net()
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)  # the conv hands FlexPool a channels_last map
    x = _net_input(layout)
    compiled = compiled_matches_eager(net, x, backend)
    net.eval()
    with torch.no_grad():
        before = net(x)
        net[1].weight.mul_(-2.0)  # an in-place update must reach the compiled graph
        assert not torch.allclose(net(x), before, atol=1e-4), "the update must change the output"
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_export_matches_eager(strict, layout):
    net = _tiny_net()
    x = _net_input(layout)
    ep = torch.export.export(net, (x,), strict=strict)
    x2 = _net_input(layout, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), net(x2), rtol=1e-5, atol=1e-6)
        # The exported graph computes the softmax itself: a later weight update shows up.
        exported, before = ep.module(), net(x2)
        net[1].weight.mul_(-2.0)
        assert not torch.allclose(net(x2), before, atol=1e-4), "the update must change the output"
        torch.testing.assert_close(exported(x2), net(x2), rtol=1e-5, atol=1e-6)


def test_fx_symbolic_trace_matches_eager():
    net = _tiny_net()
    x = torch.randn(2, 3, 6, 5)
    gm = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-6)
