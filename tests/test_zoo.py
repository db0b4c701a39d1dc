"""Zoo coverage: convert a spread of timm and torchvision models, check function preservation
and a save/load round trip for each.

Every model is built at random init (no network) at a small input size whose last feature
map is larger than 1x1, so FlexPool really replaces a pool. For each model:

1. ``flexsurgeon.convert(name, ...)`` by name, as a user would;
2. a fresh source model is built independently and given the converted model's weights
   through a *strict* ``load_state_dict`` of the original parameter names (so the names
   survived surgery), and the two agree in eval mode;
3. the output gives FlexPool's weights a gradient (the new pool is live), then FlexPool and
   SAC weights are perturbed so the round trip has to carry them;
4. ``save`` then ``load``: the loaded model has the same plan, the same tensors and the
   same eval output as the saved one.

The whole zoo (hundreds of models) is walked by ``benchmarks/zoo_coverage.py``.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import flexsurgeon
from flexsurgeon.surgery.apply import new_parameter_names
from flexsurgeon.surgery.convert import PRESERVATION_TOLERANCE
from flexsurgeon.surgery.sources import build_source, parse_source

NUM_CLASSES = 5

# (model, input size): the smallest variant of each family, at 64 where the network allows
# it (stride 32 -> a 2x2 map). Larger sizes where the network needs them, with the reason.
TIMM_MODELS = [
    ("resnet10t", 64),
    ("resnext26ts", 64),
    ("efficientnet_b0", 64),
    ("efficientnetv2_rw_t", 64),
    ("mobilenetv2_050", 64),
    ("mnasnet_050", 64),
    ("mobilenetv3_small_050", 64),
    ("mobilenetv4_conv_small_035", 64),
    ("mixnet_s", 64),
    ("lcnet_050", 64),
    ("convnext_atto", 64),
    ("regnetx_002", 64),
    ("regnety_002", 64),
    ("densenet121", 64),
    ("vgg11", 256),  # a 7x7 conv ("pre_logits" ConvMlp) follows the 8x8 map; 64..224 leave a 1x1 map
    ("inception_v3", 107),  # needs >= 75; at 75..106 Mixed_7a pools its map to 1x1
    ("dla34", 64),
    ("hrnet_w18_small", 64),
    ("ghostnet_050", 64),
    ("rexnet_100", 64),
    ("cs3darknet_s", 64),
    ("darknet17", 64),
    ("nf_regnet_b0", 64),
    ("res2net50_14w_8s", 64),
    ("resnest14d", 64),
    ("selecsls42b", 96),  # the head's two stride-2 convs (no padding) leave 1x1 at 64
    ("dpn48b", 64),
    ("xception41", 64),
    ("repvgg_a0", 64),
    ("legacy_seresnet18", 64),
    ("hgnetv2_b0", 64),
    ("repghostnet_050", 64),
    ("tresnet_m", 64),
    ("vovnet39a", 64),
    ("ghostnetv2_100", 64),
    ("mobileone_s0", 64),
    ("mambaout_femto", 64),  # pools a channels-last (B, H, W, C) map
    ("inception_v4", 107),  # at 75 its last map is 1x1 (refused, see below)
]
TIMM_SLOW = [  # larger members, run with -m slow
    ("resnet50", 64),
    ("dm_nfnet_f0", 64),
    ("hrnet_w18", 64),
    ("efficientnet_b3", 64),
    ("convnext_tiny", 64),
    ("regnetz_b16", 64),
    ("cspresnet50", 64),
]
TV_MODELS = [
    ("tv:resnet18", 64),
    ("tv:mobilenet_v3_small", 64),
    ("tv:efficientnet_b0", 64),
    ("tv:densenet121", 64),
    ("tv:shufflenet_v2_x0_5", 64),
    ("tv:mnasnet0_5", 64),
    ("tv:squeezenet1_0", 64),  # classifier conv before the pool: a 3x3 map at 64
    ("tv:regnet_x_400mf", 64),
    ("tv:googlenet", 64),
    ("tv:convnext_tiny", 64),
    ("tv:inception_v3", 107),
    ("tv:efficientnet_v2_s", 64),
    ("tv:swin_t", 64),  # permutes to NHWC and back, then pools a 2x2 map: converts like a CNN
]
TV_SLOW = [
    ("tv:resnext50_32x4d", 64),
    ("tv:wide_resnet50_2", 64),
]

# One test per family: run with -m zoo (tests/test_model_api.py covers a few families in the
# default run); the largest ones also with -m slow.
CASES = [pytest.param(n, s, id=n, marks=pytest.mark.zoo) for n, s in TIMM_MODELS + TV_MODELS] + [
    pytest.param(n, s, id=n, marks=[pytest.mark.zoo, pytest.mark.slow]) for n, s in TIMM_SLOW + TV_SLOW]


def _assert_same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """float32 equality up to the library's tolerance, relative to the output's scale.

    Random-init networks without their trained statistics can have huge logits (timm's
    inception_v3 reaches 1e10); 1e-5 of that scale is float32 rounding, not a change.
    """
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: the reference output is not finite"
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    assert diff <= PRESERVATION_TOLERANCE * scale, f"{what}: max abs diff {diff:.3g} (output scale {scale:.3g})"


def _eval_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(("name", "size"), CASES)
def test_zoo_convert_preserves_and_round_trips(name, size, tmp_path):
    torch.manual_seed(0)
    converted = flexsurgeon.convert(name, img_size=size, num_classes=NUM_CLASSES, weights="random")
    plan = converted.flexsurgeon_plan
    assert plan.pools, "no pool replaced"
    assert all(p.size[0] * p.size[1] > 1 for p in plan.pools), f"FlexPool is a no-op at {size}: {plan.pools}"

    # The source, built independently, with the converted model's weights under their original names.
    source = build_source(parse_source(name, num_classes=NUM_CLASSES), "random")
    assert type(converted) is type(source), f"{name}: the converted model lost its class"
    new = set(new_parameter_names(converted))
    state = converted.state_dict()
    original = OrderedDict((k, v) for k, v in state.items() if k not in new)
    original._metadata = state._metadata  # module versions (torchvision's MNASNet checks its own)
    source.load_state_dict(original, strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    out = _eval_out(converted, x)
    assert out.shape == (2, NUM_CLASSES)
    _assert_same(out, _eval_out(source, x), f"{name}: converted vs source")

    # The new pool is on the output's path: the output gives its weights a gradient. (A gradient,
    # not a perturbed output: some random-init networks pool maps of ~1e-10, under the bias.)
    converted(x).square().sum().backward()
    pools = [converted.get_parameter(k) for k in new if not k.startswith("sac_heads.")]
    dead = [k for k in new if not k.startswith("sac_heads.") and converted.get_parameter(k).grad is None]
    assert pools or plan.pool == "avg", f"{name}: no new pool parameters"
    assert not dead, f"{name}: FlexPool {dead} gets no gradient from the output"
    converted.zero_grad(set_to_none=True)

    # New weights away from their initial values, so the round trip must really load them.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for key, param in converted.named_parameters():
            if key in new:
                param.add_(torch.randn(param.shape, generator=generator))
    moved = _eval_out(converted, x)

    folder = flexsurgeon.save(converted, tmp_path / "ckpt")
    loaded = flexsurgeon.load(folder)
    assert loaded.flexsurgeon_plan == plan
    saved_state, loaded_state = converted.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    different = [k for k in saved_state if not torch.equal(saved_state[k], loaded_state[k])]
    assert not different, f"{name}: tensors differ after load: {different[:5]}"
    _assert_same(_eval_out(loaded, x), moved, f"{name}: loaded vs saved")


def test_zoo_spread():
    """The zoo run (-m zoo) covers at least 25 timm families and 8 torchvision models."""
    import timm.models._registry as registry

    modules = {registry._model_to_module[n] for n, _ in TIMM_MODELS}
    required = {"resnet", "efficientnet", "mobilenetv3", "convnext", "regnet", "densenet", "vgg",
                "inception_v3", "dla", "hrnet", "ghostnet", "rexnet", "cspnet", "nfnet", "byobnet"}
    assert required <= modules, sorted(required - modules)
    assert len(TIMM_MODELS) >= 27 and len(TV_MODELS) >= 8
    names = " ".join(n for n, _ in TIMM_MODELS)
    for family in ("resnext", "mobilenetv4", "mobilenetv3", "efficientnet", "vgg", "inception", "nf_"):
        assert family in names, family


@pytest.mark.parametrize(("name", "size"), [
    pytest.param("inception_v4", 75, id="inception_v4-75"),  # a reduction block's 3x3 window covers the 3x3 map
    pytest.param("vgg11", 224, id="vgg11-224"),  # its 7x7 pre-logits conv leaves a 1x1 map
    pytest.param("tv:vgg11", 64, id="tv:vgg11"),  # flattens the map into Linear layers: nothing to pool
])
def test_zoo_refuses_models_without_a_spatial_pool(name, size):
    """Where the last map is 1x1 or never pooled, convert refuses with a message, never converts a local pool."""
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="no global average pool"):
        flexsurgeon.convert(name, img_size=size, num_classes=NUM_CLASSES, weights="random")
