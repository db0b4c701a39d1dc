"""Tests for flexsurgeon.layers.token_pool: TokenFlexPool and flex_pool_tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexsurgeon.layers.kinds import FLEXPOOL_KINDS
from flexsurgeon.layers.token_pool import TokenFlexPool, flex_pool_tokens

C, GRID, PREFIX = 6, (3, 4), 2  # two prefix tokens (class + register), a non-square 3x4 patch grid
N = PREFIX + GRID[0] * GRID[1]

# (start, the source's reduction): what timm's heads compute.
SOURCES = {
    "mean_patches": ("avg", lambda x: x[:, PREFIX:].mean(1)),
    "mean_all": (("mean", 0, None), lambda x: x.mean(1)),
    "class_token": ("token", lambda x: x[:, 0]),
}


def _x(n=N, b=5, seed=0, dtype=torch.float32):
    return torch.randn(b, n, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _pool(source="mean_patches", pool="softmax", **kw):
    kw.setdefault("grid", GRID)
    kw.setdefault("num_prefix", PREFIX)
    return TokenFlexPool(C, N, SOURCES[source][0], pool=pool, **kw)


def _perturb(m: TokenFlexPool, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_starts_equal_to_source_reduction(source, pool):
    m = _pool(source, pool).eval()
    x = _x()
    want = SOURCES[source][1](x)
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)
    if source == "class_token":
        assert torch.equal(m(x), want), "a class-token start is exactly the class token"


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
def test_mean_over_a_range_without_grid_starts_equal(pool):
    m = TokenFlexPool(C, 9, ("mean", 2, 7), pool=pool).eval()
    x = _x(9)
    torch.testing.assert_close(m(x), x[:, 2:7].mean(1), rtol=0, atol=1e-5)
    a = m.pooling_weights()
    assert a.shape == (C, 9)
    torch.testing.assert_close(a[:, 2:7], torch.full((C, 5), 0.2))
    assert not a[:, :2].any() and not a[:, 7:].any(), "tokens outside the range have zero weight"


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_output_is_pooling_weights_times_tokens(source, pool):
    """After training moves the weights, ``y[b, c] = sum_t A[c, t] x[b, t, c]`` with A from pooling_weights,
    and the functional form gives the same."""
    m = _pool(source, pool).eval()
    _perturb(m)
    x = _x()
    a = m.pooling_weights()
    assert a.dtype == torch.float32 and a.shape == (C, N)
    want = torch.einsum("btc,ct->bc", x, a)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flex_pool_tokens(x, a), want, rtol=1e-5, atol=1e-6)
    if pool == "softmax":
        torch.testing.assert_close(a.sum(1), torch.ones(C))


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_one_sgd_step_changes_pooling_weights_in_every_channel(source, pool):
    m = _pool(source, pool)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(16, N, C, generator=g), torch.randn(16, C, generator=g)
    before = m.pooling_weights().detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    F.mse_loss(m(x), target).backward()
    opt.step()
    change = (m.pooling_weights().detach() - before).abs().sum(1)
    assert (change > 1e-4).all(), f"per-channel change of the pooling weights {change.tolist()}"


def test_class_token_softmax_start_learns_through_gamma():
    """The softmax class-token start is e + gamma (softmax(W) - e): the first step moves gamma
    (W's gradient is zero while gamma is), and the weights keep summing to one."""
    m = _pool("class_token", "softmax")
    x, target = _x(b=16, seed=2), _x(b=16, seed=3)[:, 0]
    F.mse_loss(m(x), target).backward()
    assert (m.gamma.grad.abs() > 1e-4).all()
    assert not m.weight.grad.any()
    with torch.no_grad():
        m.gamma.sub_(m.gamma.grad)
    a = m.pooling_weights()
    torch.testing.assert_close(a.sum(1), torch.ones(C))
    assert (a[:, 0] < 1).any() and (a[:, 1:] != 0).any(), "weight moved from the class token to other tokens"


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_starts_equal_source_at_another_grid(source, pool):
    m = _pool(source, pool).eval()
    x = _x(PREFIX + 5 * 7)
    torch.testing.assert_close(m(x, grid=(5, 7)), SOURCES[source][1](x), rtol=0, atol=1e-5)
    if source == "class_token":
        a = m.pooling_weights(grid=(5, 7))
        assert torch.equal(a[:, 0], torch.ones(C)) and not a[:, 1:].any(), "prefix one-hot kept"


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_another_grid_resamples_patch_weights_keeping_prefix_parameters(source, pool):
    m = _pool(source, pool).eval()
    _perturb(m)
    new = (5, 7)
    first = PREFIX if source == "mean_patches" else 0
    w = m.weight.detach()
    patches = F.interpolate(w[None, :, PREFIX - first :].view(1, C, *GRID), size=new, mode="bilinear",
                            align_corners=False)[0].flatten(1)
    resampled = torch.cat([w[:, : PREFIX - first], patches], 1)
    if pool == "softmax":
        want = resampled.softmax(1)
        if source == "class_token":
            e = F.one_hot(torch.tensor(0), resampled.shape[1]).float()
            want = e + m.gamma.detach()[:, None] * (want - e)
    else:
        want = resampled * (w.sum(1) / resampled.sum(1))[:, None]
    want = F.pad(want, (first, 0))
    got = m.pooling_weights(grid=new)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if pool == "linear":
        # Each channel keeps its sum, and the prefix-to-patch ratios are the stored ones.
        torch.testing.assert_close(got.sum(1), w.sum(1), rtol=1e-5, atol=1e-6)
    x = _x(PREFIX + new[0] * new[1])
    torch.testing.assert_close(m(x, grid=new), torch.einsum("btc,ct->bc", x, got), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.patch_weights(new), got[:, PREFIX:].view(C, *new))


def test_grid_is_inferred_with_the_native_aspect_ratio():
    m = _pool("mean_patches", "linear").eval()
    _perturb(m)
    x = _x(PREFIX + 6 * 8)  # 3x4 doubled
    torch.testing.assert_close(m(x), m(x, grid=(6, 8)))
    assert not torch.allclose(m(x, grid=(8, 6)), m(x, grid=(6, 8))), "the grid matters"
    with pytest.raises(ValueError, match="pass grid="):
        m(_x(PREFIX + 7))  # 7 patches: no 3:4 grid
    with pytest.raises(ValueError, match="is not 10 tokens"):
        m(_x(10), grid=(3, 3))


@pytest.mark.parametrize("source", ["mean_all", "class_token"])
def test_other_token_count_without_grid_is_value_error(source):
    m = TokenFlexPool(C, N, SOURCES[source][0])
    m(_x(N))
    with pytest.raises(ValueError, match=f"built for {N} tokens and has no patch grid"):
        m(_x(N + 1))
    with pytest.raises(ValueError, match="no patch grid"):
        m(_x(N), grid=GRID)


def test_wrong_input_shape_is_value_error_naming_it():
    m = _pool()
    with pytest.raises(ValueError, match=r"3-D \(B, N, C\) input, got shape \(5, 6\)"):
        m(torch.randn(5, C))
    with pytest.raises(ValueError, match=rf"\(2, {N}, 4\) has 4 channels .* has {C}"):
        m(torch.randn(2, N, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "max"}, "start must be"),
        ({"start": ("mean", 3, 3)}, "first < last"),
        ({"start": ("token", N)}, "index < num_tokens"),
        ({"start": "avg", "pool": "avg"}, "unknown TokenFlexPool pool"),
        ({"start": "avg", "grid": (4, 4), "num_prefix": PREFIX}, "is not num_tokens"),
        ({"start": ("mean", 0, N - 1), "grid": GRID, "num_prefix": PREFIX}, "must read the whole grid"),
        ({"start": ("mean", PREFIX + 1, N), "grid": GRID, "num_prefix": PREFIX}, "must read the whole grid"),
        ({"start": ("token", PREFIX), "grid": GRID, "num_prefix": PREFIX}, "must read a prefix token"),
    ],
)
def test_invalid_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenFlexPool(C, N, **kwargs)


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
def test_dropout_only_in_train_mode(pool):
    x = _x(b=64)
    m = _pool("class_token", pool, dropout=0.5)
    m.eval()
    assert torch.equal(m(x), x[:, 0])
    m.train()
    y = m(x)
    dropped = y == 0
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(y[~dropped], 2 * x[:, 0][~dropped])
    no_drop = _pool("class_token", pool, dropout=0.0).train()
    assert torch.equal(no_drop(x), x[:, 0]), "p=0 is the identity in train mode"


@pytest.mark.parametrize("source", SOURCES)
def test_regularizer(source):
    linear, softmax = _pool(source, "linear"), _pool(source, "softmax")
    assert linear.regularizer().item() == pytest.approx(0.0, abs=1e-10)
    assert softmax.regularizer().item() == 0.0
    _perturb(linear)
    _perturb(softmax)
    want = (linear.weight.sum(1) - 1).square().sum()
    torch.testing.assert_close(linear.regularizer(), want)
    assert want > 0.1
    assert softmax.regularizer().item() == 0.0, "softmax weights always sum to one"
    linear.regularizer().backward()
    assert linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_gradient_flows_to_the_input(source, pool):
    m = _pool(source, pool)
    _perturb(m)
    x = _x().requires_grad_(True)
    m(x).sum().backward()
    want = m.pooling_weights().detach().t().expand_as(x)
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", SOURCES)
def test_low_precision_input(source, dtype):
    m = _pool(source, "softmax").eval()
    _perturb(m)
    x = _x(dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), m(x.float()), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == dtype, "the weighted sum keeps the input's dtype under autocast"
    assert m.pooling_weights().dtype == torch.float32


def _head(source="class_token", pool="softmax"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(C, C), _pool(source, pool), nn.Linear(C, 3)).eval()
    _perturb(net[1])
    return net


@pytest.mark.parametrize("leaf", [False, True])
def test_fx_symbolic_trace_matches_eager(leaf):
    net = _head()

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return (leaf and isinstance(m, TokenFlexPool)) or super().is_leaf_module(m, qualname)

    gm = torch.fx.GraphModule(net, Tracer().trace(net))
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert ("1" in called) == leaf
    x = _x(seed=3)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.fx.symbolic_trace(net)(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("pool", FLEXPOOL_KINDS)
def test_torch_compile_fullgraph_matches_eager(pool, compiled_matches_eager):
    compiled_matches_eager(_head("class_token", pool), _x(seed=4))


def test_extra_repr_names_the_configuration():
    r = repr(_pool("class_token", "linear", dropout=0.1))
    for part in ("channels=6", f"num_tokens={N}", "start=('token', 0)", "grid=(3, 4)", "num_prefix=2",
                 "pool='linear'", "dropout=0.1"):
        assert part in r
