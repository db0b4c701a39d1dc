"""Tests for flexsurgeon.layers: FlexPool, flex_pool2d and SACHead."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from flexsurgeon import cpu_kernel
from flexsurgeon.layers import POOL_MODES, FlexPool, SACHead, _inference_kernel, flex_pool2d

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


def _reference(x: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.Tensor:
    """Naive definition: y[b, c] = sum_{h,w} A[c,h,w] x[b,c,h,w]."""
    c, h, w = weight.shape
    a = weight.flatten(1).softmax(-1).view(c, h, w) if mode == "softmax" else weight
    return (a * x).sum((2, 3))


@pytest.mark.parametrize("mode", POOL_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flatten", [True, False])
def test_equals_mean_at_init_float32(mode, layout, flatten):
    pool = FlexPool(5, (4, 6), mode=mode, flatten=flatten).eval()
    x = _input(layout=layout)
    expected = x.mean((2, 3), keepdim=not flatten)
    for grad in (True, False):  # uncached and cached paths
        with torch.set_grad_enabled(grad):
            y = pool(x)
        assert y.shape == expected.shape == ((3, 5) if flatten else (3, 5, 1, 1))
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", POOL_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_mean_at_init_low_precision(dtype, mode, layout):
    pool = FlexPool(5, (4, 6), mode=mode).eval()
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


@pytest.mark.parametrize("mode", POOL_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(8, 9), (2, 3), (4, 6)])
def test_other_input_size_is_mean_at_init(mode, layout, size):
    pool = FlexPool(5, (4, 6), mode=mode).eval()
    x = _input((2, 5, *size), layout=layout)
    torch.testing.assert_close(pool(x), x.mean((2, 3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", POOL_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_trained_weight_matches_naive_reference_at_native_size(mode, layout):
    pool = FlexPool(5, (4, 6), mode=mode).eval()
    _perturb(pool)
    x = _input(layout=layout)
    expected = _reference(x, pool.weight.detach(), mode)
    assert not torch.allclose(expected, x.mean((2, 3)), atol=1e-3)  # the weights matter
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flex_pool2d(x, pool.weight.detach(), mode=mode), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", POOL_MODES)
def test_pooling_weights_are_what_the_pool_applies(mode):
    pool = FlexPool(5, (4, 6), mode=mode).eval()
    torch.testing.assert_close(pool.pooling_weights(), torch.full((5, 4, 6), 1 / 24))  # average pooling
    _perturb(pool)
    for size in ((4, 6), (7, 3)):
        a = pool.pooling_weights(size)
        assert a.shape == (5, *size) and a.dtype == torch.float32
        x = _input((2, 5, *size))
        torch.testing.assert_close(pool(x), (x * a).sum((2, 3)), rtol=1e-5, atol=1e-6)
    if mode == "softmax":
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
    pool = FlexPool(5, (4, 6), mode="linear").eval()
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
    pool = FlexPool(2, (1, 2), mode="linear")
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
    head = SACHead(5, (4, 6), num_classes=7, mode="linear", dropout=0.0).eval()
    assert isinstance(head.pool, FlexPool) and isinstance(head.fc, nn.Linear)
    assert [n for n, _ in head.named_parameters()] == ["pool.weight", "fc.weight", "fc.bias"]
    x = _input()
    torch.testing.assert_close(head(x), head.fc(x.mean((2, 3))), rtol=0, atol=1e-5)
    with torch.no_grad():
        head.pool.weight.mul_(2.0)
    torch.testing.assert_close(head.regularizer(), head.pool.regularizer())
    assert head.regularizer().item() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_reach_weight_and_input(layout):
    pool = FlexPool(5, (4, 6)).train()
    _perturb(pool)
    x = _input(layout=layout).requires_grad_(True)
    w = pool.weight.detach().clone().requires_grad_(True)
    pool(x).square().sum().backward()
    _reference(x.detach().requires_grad_(False), w, "softmax").square().sum().backward()
    torch.testing.assert_close(pool.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    x2 = x.detach().clone().requires_grad_(True)
    _reference(x2, pool.weight.detach(), "softmax").square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


# Inputs large enough for the ATen inference kernels (batch*H*W >= 512 for NCHW,
# >= 2**20 elements for channels_last), small enough to stay fast.
_LARGE = {"nchw": ((16, 6, 8, 8), "bmm", "fused-rows"), "channels_last": ((4, 64, 64, 64), "conv", "fused-cols")}


@pytest.fixture(params=["fused", "aten"])
def inference_kernels(request, monkeypatch):
    """Run a test with the fused CPU kernel, and again as a machine without it would."""
    if request.param == "fused":
        if not cpu_kernel.available():
            pytest.skip(f"fused CPU kernel not available: {cpu_kernel.unavailable_reason()}")
    else:
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flatten", [True, False])
def test_inference_kernels_match_reference_and_training_path(layout, flatten, inference_kernels):
    shape, aten_kernel, fused_kernel = _LARGE[layout]
    x = _input(shape, layout=layout)
    # the kernel under test is the one picked
    assert _inference_kernel(x) == (fused_kernel if inference_kernels == "fused" else aten_kernel)
    pool = FlexPool(shape[1], shape[2:], flatten=flatten).eval()
    _perturb(pool)
    expected = _reference(x, pool.weight.detach(), "softmax")
    expected = expected if flatten else expected[:, :, None, None]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            y = pool(x)
        assert y.shape == expected.shape
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        # What heads do next works on the output as it comes (bmm's is transposed).
        head = nn.Linear(shape[1], 3)
        with context():
            torch.testing.assert_close(head(y.view(shape[0], -1)), head(expected.reshape(shape[0], -1)))
    torch.testing.assert_close(pool(x).detach(), expected, rtol=1e-5, atol=1e-6)  # grad on: multiply-reduce
    with torch.no_grad():
        torch.testing.assert_close(flex_pool2d(x, pool.weight, flatten=flatten), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_kernels_only_without_autograd_and_in_float32(layout, inference_kernels):
    shape, _, fused_kernel = _LARGE[layout]
    x = _input(shape, layout=layout)
    training = "rows" if layout == "nchw" else "cols"
    assert _inference_kernel(x.bfloat16()) == training
    assert _inference_kernel(x[:, :, ::2]) == "rows"  # strided: no kernel reads it in place
    small = _input((1, shape[1], 2, 2), layout=layout)  # ATen: the multiply-reduce is faster
    assert _inference_kernel(small) == (fused_kernel if inference_kernels == "fused" else training)
    # A frozen FlexPool before a layer that trains still passes the gradient to its input.
    pool = FlexPool(shape[1], shape[2:]).eval().requires_grad_(False)
    _perturb(pool)
    x = x.requires_grad_(True)
    pool(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    _reference(x2, pool.weight, "softmax").square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_cache_invalidates_on_inplace_update(layout):
    pool = FlexPool(5, (4, 6)).eval()
    x = _input(layout=layout)
    with torch.no_grad():
        before = pool(x)
        assert pool._cache is not None  # the cached path is the one under test
        pool.weight.add_(torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(3)))
        after = pool(x)
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, _reference(x, pool.weight.detach(), "softmax"), rtol=1e-5, atol=1e-6)


def test_eval_cache_invalidates_on_optimizer_step_and_load_state_dict():
    pool = FlexPool(5, (4, 6), mode="linear")
    x = _input()
    opt = torch.optim.SGD(pool.parameters(), lr=1.0)
    pool.eval()
    with torch.inference_mode():
        y0 = pool(x)
    pool.train()
    pool(x).square().sum().backward()
    opt.step()
    pool.eval()
    with torch.inference_mode():
        y1 = pool(x)
    assert not torch.allclose(y0, y1, atol=1e-4)
    torch.testing.assert_close(y1, _reference(x, pool.weight.detach(), "linear"), rtol=1e-5, atol=1e-6)
    pool.load_state_dict(FlexPool(5, (4, 6), mode="linear").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pool(x), x.mean((2, 3)), rtol=0, atol=1e-6)


def test_cache_keys_on_dtype_and_layout():
    pool = FlexPool(5, (4, 6)).eval()
    _perturb(pool)
    x = _input()
    with torch.no_grad():
        ref = pool(x)
        torch.testing.assert_close(pool(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-6)
        y16 = pool(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        torch.testing.assert_close(y16.float(), ref, rtol=0, atol=5e-2)
        assert pool(x).dtype == torch.float32


def test_repeated_inference_calls_follow_every_change():
    """The inference fast path reuses the last call's decisions; any change must show."""
    pool = FlexPool(6, (8, 8)).eval()
    _perturb(pool)
    small, large = _input((2, 6, 8, 8)), _input((16, 6, 8, 8))  # rows, then bmm
    with torch.no_grad():
        for x in (small, small, large, large, small, large.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(pool(x), _reference(x, pool.weight, "softmax"), rtol=1e-5, atol=1e-6)
        pool(small)
        pool.weight.data = torch.zeros(6, 8, 8)  # new storage, same Parameter
        torch.testing.assert_close(pool(small), small.mean((2, 3)), rtol=0, atol=1e-6)
        pool.weight.mul_(2.0).add_(1.0)  # in place: a new version
        torch.testing.assert_close(pool(small), small.mean((2, 3)), rtol=0, atol=1e-6)
        _perturb(pool)
        torch.testing.assert_close(pool(small.double()), _reference(small.double(), pool.weight.double(), "softmax"))
    torch.testing.assert_close(pool(small).detach(), _reference(small, pool.weight.detach(), "softmax"),
                               rtol=1e-5, atol=1e-6)


def test_cache_not_in_state_dict_and_not_pickled():
    pool = FlexPool(5, (4, 6)).eval()
    with torch.no_grad():
        pool(_input())
    assert pool._cache is not None
    assert list(pool.state_dict()) == ["weight"]
    assert list(SACHead(5, 4, 3).state_dict()) == ["pool.weight", "fc.weight", "fc.bias"]
    assert pool._fast is not None
    assert pickle.loads(pickle.dumps(pool))._cache is None and pickle.loads(pickle.dumps(pool))._fast is None
    assert copy.deepcopy(pool)._cache is None and copy.deepcopy(pool)._fast is None


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
    r = repr(FlexPool(8, (3, 4), mode="linear", dropout=0.25))
    for part in ("channels=8", "size=(3, 4)", "mode='linear'", "dropout=0.25"):
        assert part in r


def test_invalid_mode_names_choices():
    with pytest.raises(ValueError, match="'softmax', 'linear'") as e:
        FlexPool(4, 3, mode="max")
    assert "'max'" in str(e.value)
    with pytest.raises(ValueError, match="'softmax', 'linear'"):
        flex_pool2d(_input(), torch.zeros(5, 4, 6), mode="mean")


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


def test_torch_compile_matches_eager():
    net = _tiny_net()
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        eager = net(x)
        net(x)  # populate the cache first: compiling must not depend on it
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)  # grad-enabled too
    with torch.no_grad():
        net[1].weight.mul_(-2.0)  # an in-place update must reach the compiled graph
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(net(x), eager, atol=1e-4)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_matches_eager(strict):
    net = _tiny_net()
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        eager = net(x)
    ep = torch.export.export(net, (x,), strict=strict)
    assert not any("cache" in k for k in ep.state_dict)
    # The exported graph computes the softmax itself: a later weight update shows up.
    torch.testing.assert_close(ep.module()(x), eager, rtol=1e-5, atol=1e-6)
    x2 = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), net(x2), rtol=1e-5, atol=1e-6)


def test_fx_symbolic_trace_matches_eager():
    net = _tiny_net()
    x = torch.randn(2, 3, 6, 5)
    gm = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-6)
