import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from flexsurgeon.errors import AnalysisError, TraceError
from flexsurgeon.surgery.analysis import analyse, find_tap
from flexsurgeon.surgery.trace import trace_model


class _Net(nn.Module):
    """A small CNN whose head pool is written in one of the ways models write it."""

    def __init__(self, pool: str, se: bool = False):
        super().__init__()
        self.pool_kind = pool
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.se = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1), nn.Sigmoid()) if se else None
        self.module_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.se is not None:
            x = x * self.se(x.mean((2, 3), keepdim=True))
        kind = self.pool_kind
        if kind == "module":
            x = self.module_pool(x).flatten(1)
        elif kind == "adaptive":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif kind == "avg_pool2d":
            x = F.avg_pool2d(x, x.shape[2:]).flatten(1)
        elif kind == "mean":
            x = x.mean((2, 3))
        elif kind == "mean_keepdim":
            x = x.mean([-2, -1], keepdim=True).flatten(1)
        elif kind == "torch_mean":
            x = torch.mean(x, dim=(2, 3))
        elif kind == "flatten_mean":
            x = x.flatten(2).mean(-1)
        elif kind == "nhwc":  # a channels-last block (Swin, MambaOut): (B, H, W, C).mean((1, 2))
            x = x.permute(0, 2, 3, 1).mean((1, 2))
        elif kind == "nhwc_keepdim":
            x = x.permute(0, 2, 3, 1).mean((1, 2), keepdim=True).flatten(1)
        elif kind == "max":
            x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.fc(x)


@pytest.mark.parametrize("kind", ["module", "adaptive", "avg_pool2d", "mean", "mean_keepdim", "torch_mean",
                                  "flatten_mean", "nhwc", "nhwc_keepdim"])
def test_every_way_of_writing_average_pooling_is_found_as_the_head_pool(kind):
    if kind == "avg_pool2d" and torch.__version__ < "2.11":
        pytest.skip("torch.fx before 2.11 cannot pass x.shape[2:] as kernel_size (seen failing on 2.3.1)")
    analysis = analyse(_Net(kind), (32, 32))
    heads = analysis.head_pools
    assert len(heads) == 1
    assert heads[0].channels == 16 and heads[0].size == (8, 8)
    assert heads[0].keepdim == (kind in ("module", "adaptive", "avg_pool2d", "mean_keepdim", "nhwc_keepdim"))
    assert heads[0].layout == ("nhwc" if kind.startswith("nhwc") else "nchw")


@pytest.mark.parametrize("kind", ["module", "mean", "nhwc", "nhwc_keepdim", "flatten_mean"])
def test_converting_each_pool_form_preserves_the_output_and_the_class(kind):
    """A pool module is swapped in place; a pool written as code gets that forward regenerated."""
    import copy

    import flexsurgeon
    from flexsurgeon.layers.pools import FlexPool

    torch.manual_seed(0)
    source = _Net(kind).eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=32, sac_stages=[]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (converted(x) - reference(x)).abs().max() <= 1e-5
    assert type(converted) is _Net
    (edit,) = converted.flexsurgeon_plan.pools
    if kind == "module":
        assert (edit.replacement, edit.module) == ("in_place", "module_pool")
        assert isinstance(converted.module_pool, FlexPool) and "forward" not in vars(converted)
    else:
        assert (edit.replacement, edit.module) == ("graph_rewrite", "")
        assert len(converted.flex_pools) == 1 and "forward" in vars(converted)


def test_max_pool_is_reported_but_not_replaceable():
    analysis = analyse(_Net("max"), (32, 32))
    assert [p.kind for p in analysis.pools] == ["other"]
    assert analysis.head_pools == []


def test_squeeze_excite_pool_is_gating_and_head_pool_is_head():
    analysis = analyse(_Net("mean", se=True), (32, 32))
    roles = sorted(p.role for p in analysis.pools)
    assert roles == ["gating", "head"]


@pytest.mark.parametrize("name,gating", [("efficientnet_b0", 16), ("mobilenetv3_small_100", 9), ("resnet18", 0)])
def test_timm_models_have_one_head_pool_and_their_se_pools_are_gating(name, gating):
    analysis = analyse(timm.create_model(name), (64, 64))
    assert len(analysis.head_pools) == 1
    assert sum(p.role == "gating" for p in analysis.pools) == gating


# ghostnet is left out on purpose: its feature_info names blocks.5 at stride 16, but blocks.6
# also runs at stride 16, and our boundary (the last node before the resolution drops) is there.
@pytest.mark.parametrize("name", ["resnet18", "resnet26d", "efficientnet_b0", "mobilenetv3_small_100",
                                  "convnext_atto", "densenet121", "regnetx_002", "rexnet_100",
                                  "cspresnet50", "dla34", "mobilenetv2_050"])
def test_stage_boundaries_match_timm_feature_info(name):
    model = timm.create_model(name)
    analysis = analyse(model, (64, 64))
    info = model.feature_info
    by_reduction = {s.reduction: s for s in analysis.stages}
    for entry in info[:-1]:
        stage = by_reduction.get(entry["reduction"])
        assert stage is not None, f"no stage at reduction {entry['reduction']}: {analysis.stages}"
        assert stage.channels == entry["num_chs"], (stage, entry)
    # the last stage is the map the head pool reads, at the last feature_info reduction
    assert analysis.stages[-1].reduction == info[-1]["reduction"]
    assert analysis.stages[-1].node == analysis.head_pools[0].input


def test_analysis_changes_nothing():
    model = timm.create_model("efficientnet_b0", drop_rate=0.2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyse(model, (64, 64))
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched too


def test_taps_by_module_path_and_node_name():
    analysis = analyse(timm.create_model("resnet18"), (64, 64))
    by_module = find_tap(analysis, "layer2")
    assert by_module.node == "layer2_1_act2" and by_module.channels == 128 and by_module.size == (8, 8)
    assert find_tap(analysis, "layer3_1_act2").reduction == 16


def test_unknown_tap_suggests_close_names():
    analysis = analyse(timm.create_model("resnet18"), (64, 64))
    with pytest.raises(AnalysisError, match="did you mean.*layer2"):
        find_tap(analysis, "layr2")


def test_too_small_input_says_so():
    with pytest.raises(AnalysisError, match="too small.*built for 299x299.*--img-size 299"):
        analyse(timm.create_model("inception_v3"), (16, 16))


def test_a_model_of_one_input_size_is_told_its_size():
    import torchvision

    vit = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2,
                                               hidden_dim=32, mlp_dim=32)
    with pytest.raises(AnalysisError, match="Wrong image height.*built for 64x64.*--img-size 64") as refused:
        analyse(vit, (96, 96))
    # the model's own message, with the height it got: not the one built while tracing, which
    # names a torch.fx stand-in ("got Proxy(getitem_2)")
    assert "Expected 64 but got 96!" in str(refused.value) and "Proxy" not in str(refused.value)


def test_untraceable_model_names_the_construct_and_the_leaf_fix():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = DataDependent()

        def forward(self, x):
            return self.block(x).mean((2, 3))

    with pytest.raises(TraceError, match=r"in 'block' \(DataDependent\).*register_notrace_module"):
        trace_model(Net(), training=False)


def test_forward_inputs_with_defaults_trace_at_their_defaults():
    # timm's Hiera: forward(x, mask=None). Traced with mask as a proxy, `if mask is not None`
    # recorded the masked branch, and every call without a mask failed ("'NoneType' object
    # has no attribute 'view'"), which read as an input-size problem. Now it gets the real
    # reason; a ViT (forward(x, attn_mask=None, is_causal=False)) still traces. Both now convert.
    import flexsurgeon

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for name in ("hiera_tiny_224", "vit_tiny_patch16_224"):
        source = timm.create_model(name, num_classes=5).eval()
        with torch.no_grad():
            want = source(x)
            assert torch.allclose(flexsurgeon.convert(source, img_size=224)(x), want, atol=1e-5), name


class _ListFeatures(nn.Module):
    """timm-style methods where forward_head iterates over a list (EfficientViM): fx cannot
    trace forward_head alone, so the rewrite falls back to the model's forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward_features(self, x):
        return [self.body(x).flatten(2)]

    def forward_head(self, x, pre_logits: bool = False):
        x = [t.mean(-1) for t in x]
        return x[0] if pre_logits else self.fc(x[0])

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_a_pool_in_an_untraceable_forward_head_is_rewritten_in_forward():
    import copy

    import flexsurgeon

    torch.manual_seed(0)
    source = _ListFeatures().eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=32, sac_stages=[])
    (edit,) = converted.flexsurgeon_plan.pools
    assert (edit.replacement, edit.module, edit.forward) == ("graph_rewrite", "", "forward")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(converted(x), reference(x), atol=1e-6)
