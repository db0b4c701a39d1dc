import copy
import json

import pytest
import timm
import torch
import torchvision
from timm.layers import AttentionPool2d
from timm.models.convmixer import ConvMixer

import flexsurgeon
from flexsurgeon.errors import AnalysisError
from flexsurgeon.layers.pools import FlexPool
from flexsurgeon.layers.sac_head import SACHead
from flexsurgeon.surgery.apply import new_parameter_names
from flexsurgeon.training.heads import head_parameter_names, regularizer


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=10).eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=64).eval()
    return reference, converted


def test_eval_output_equals_the_source(resnet, x64):
    reference, converted = resnet
    with torch.no_grad():
        assert (reference(x64) - converted(x64)).abs().max().item() <= 1e-5


def test_every_original_parameter_and_buffer_keeps_its_name(resnet):
    reference, converted = resnet
    original, new = reference.state_dict(), converted.state_dict()
    assert set(original) <= set(new)
    added = set(new) - set(original)
    assert added and all(k.startswith(("global_pool.", "sac_heads.")) for k in added)
    # original weights load into the converted model with only the new keys missing
    result = converted.load_state_dict(original, strict=False)
    assert set(result.missing_keys) == added and not result.unexpected_keys


def test_train_mode_forward_returns_main_logits_and_forward_with_sac_adds_heads(resnet, x64):
    _, converted = resnet
    converted.train()
    try:
        out = converted(x64)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
        logits, heads = flexsurgeon.forward_with_sac(converted, x64)
        assert logits.shape == (2, 10)
        assert [h.shape for h in heads] == [(2, 10), (2, 10)]
        loss = sum(w * torch.nn.functional.cross_entropy(o, torch.tensor([1, 2]))
                   for w, o in zip(converted.flexsurgeon_plan.sac_weights, [*heads, logits]))
        loss.backward()
        names = new_parameter_names(converted)
        assert "global_pool.weight" in names and any(n.startswith("sac_heads.") for n in names)
        for name in names:
            assert converted.get_parameter(name).grad is not None, name
        # no hook stays behind: plain forwards do not run the heads
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in converted.modules())
    finally:
        converted.zero_grad(set_to_none=True)
        converted.eval()


def test_new_layers_are_flexpool_and_sac_heads_sized_from_the_plan(resnet):
    _, converted = resnet
    plan = converted.flexsurgeon_plan
    assert plan.pools[0].replacement == "in_place" and plan.pools[0].module == "global_pool"
    pool = converted.global_pool
    assert isinstance(pool, FlexPool) and tuple(pool.weight.shape) == (512, 2, 2)
    heads = [converted.sac_heads[t.node] for t in plan.sac]
    assert all(isinstance(h, SACHead) for h in heads)
    assert [(t.module, t.read) for t in plan.sac] == [("layer2.1.act2", "output"), ("layer3.1.act2", "output")]
    assert plan.sac_weights == (0.1, 0.2, 0.7)


def test_timm_attributes_survive(resnet):
    reference, converted = resnet
    assert converted.num_classes == 10
    assert converted.num_features == reference.num_features
    assert converted.feature_info == reference.feature_info
    assert converted.pretrained_cfg["input_size"] == (3, 64, 64)
    assert timm.data.resolve_data_config(model=converted)["input_size"] == (3, 64, 64)


@pytest.mark.slow  # several seconds on 2 CPU cores: run with -m slow
def test_channels_last_and_compile_and_export_agree(resnet, x64):
    _, converted = resnet
    with torch.no_grad():
        expected = converted(x64)
        cl = copy.deepcopy(converted).to(memory_format=torch.channels_last)
        assert torch.allclose(cl(x64.to(memory_format=torch.channels_last)), expected, atol=1e-5)
        compiled = torch.compile(converted)
        assert torch.allclose(compiled(x64), expected, atol=1e-4)
    exported = torch.export.export(converted, (x64,))
    assert torch.allclose(exported.module()(x64), expected, atol=1e-5)


def test_deepcopy_gives_an_independent_working_model(resnet, x64):
    _, converted = resnet
    clone = copy.deepcopy(converted)
    with torch.no_grad():
        clone.global_pool.weight.add_(1.0)  # a softmax shift: output unchanged
        clone.fc.weight.add_(1.0)
        assert not torch.allclose(clone(x64), converted(x64))


def test_train_and_eval_graphs_are_traced_separately():
    # efficientnet writes its classifier dropout as F.dropout(x, training=self.training)
    torch.manual_seed(0)
    source = timm.create_model("efficientnet_b0", num_classes=4, drop_rate=0.5)
    converted = flexsurgeon.convert(source, img_size=64)
    x = torch.randn(4, 3, 64, 64)
    converted.train()
    with torch.no_grad():
        assert not torch.equal(converted(x), converted(x))  # dropout active in train mode
        converted.eval()
        assert torch.equal(converted(x), converted(x))


def test_linear_mode_regulariser_and_dropout_options():
    converted = flexsurgeon.convert("resnet18", img_size=64, num_classes=3, pool="linear", dropout=0.25,
                                    sac_stages=["layer3"])
    plan = converted.flexsurgeon_plan
    assert plan.pool == "linear" and plan.dropout == 0.25
    assert [t.node for t in plan.sac] == ["layer3_1_act2"] and plan.sac_weights == (0.3, 0.7)
    assert regularizer(converted).item() == pytest.approx(0.0, abs=1e-8)  # weights start summing to one
    with torch.no_grad():
        converted.get_submodule(plan.pools[0].module).weight.mul_(2)
    assert regularizer(converted).item() > 0


def test_no_sac_heads_when_asked():
    converted = flexsurgeon.convert("resnet18", img_size=64, sac_stages=[])
    assert converted.flexsurgeon_plan.sac == () and len(converted.sac_heads) == 0
    logits, heads = flexsurgeon.forward_with_sac(converted, torch.randn(2, 3, 64, 64))
    assert heads == []


def test_gating_pools_are_kept_unless_asked():
    plain = flexsurgeon.convert("mobilenetv3_small_100", img_size=64, sac_stages=[])
    gating = flexsurgeon.convert("mobilenetv3_small_100", img_size=64, sac_stages=[], replace_gating=True)
    assert len(plain.flexsurgeon_plan.pools) == 1
    assert len(gating.flexsurgeon_plan.pools) == 10


def test_model_without_a_pool_flexpool_can_start_from_gets_a_reason():
    vit = timm.create_model("vit_tiny_patch16_224", global_pool="map", depth=2, num_classes=5, img_size=32)
    with pytest.raises(AnalysisError, match=r"reads one token kept apart from the others: the output of an attention "
                                            r"pool \(a learned query over the tokens, timm's global_pool='map'\)"):
        flexsurgeon.convert(vit, img_size=32)


class _AttentionPooledCNN(torch.nn.Module):
    """A CLIP ResNet's head in small: timm's AttentionPool2d projects every token to the classes,
    then keeps token 0 (and, with pre_logits=True, token 0 before the projection)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, 4, 1)
        self.head = AttentionPool2d(16, feat_size=8, out_features=3, head_dim=8)

    def forward(self, x):
        return self.head(self.stem(x))


def test_a_pool_that_reads_another_value_under_pre_logits_is_refused_in_one_line():
    with pytest.raises(AnalysisError, match=r"one FlexPool cannot replace it"):
        flexsurgeon.convert(_AttentionPooledCNN().eval(), img_size=32)


def test_one_by_one_final_map_is_refused():
    with pytest.raises(AnalysisError, match="already 1x1"):
        flexsurgeon.convert("resnet18", img_size=32)


def test_an_instance_is_converted_in_place_and_keeps_its_class():
    source = timm.create_model("resnet18", num_classes=6)
    converted = flexsurgeon.convert(source, img_size=64)
    assert converted is source and type(converted) is timm.models.ResNet
    assert converted.flexsurgeon_plan.source.name == "resnet18"
    assert converted.flexsurgeon_plan.source.kwargs["num_classes"] == 6


def test_avg_kind_keeps_the_function_and_adds_no_pool_parameters(x64):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=5).eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=64, pool="avg").eval()
    with torch.no_grad():
        assert (reference(x64) - converted(x64)).abs().max().item() <= 1e-5
    assert not list(converted.global_pool.parameters())
    # the SAC heads pool by averaging too: a head's output is its Linear on the stage's mean
    tap = converted.flexsurgeon_plan.sac[0]
    head = converted.sac_heads[tap.node]
    feature = torch.randn(2, tap.channels, *tap.size)
    assert torch.allclose(head(feature), head.fc(feature.mean((2, 3))), atol=1e-6)


@pytest.mark.parametrize("kind, module", [("lse", "LsePlus2d"), ("simpool", "SimPool2d")])
def test_timm_baseline_pools_install_train_and_round_trip(kind, module, tmp_path, x64):
    torch.manual_seed(0)
    converted = flexsurgeon.convert("resnet10t", img_size=64, num_classes=5, pool=kind, sac_stages=[])
    pool = converted.global_pool
    assert pool.pool == kind and type(pool.timm_pool).__name__ == module
    new = new_parameter_names(converted)
    assert new and all(n.startswith("global_pool.") for n in new)
    assert set(head_parameter_names(converted)) == set(new) | {"fc.weight", "fc.bias"}
    converted.train()
    out, heads = flexsurgeon.forward_with_sac(converted, x64)
    out.sum().backward()
    assert pool.timm_pool.parameters().__next__().grad is not None and heads == []
    flexsurgeon.save(converted, tmp_path / "m")
    loaded = flexsurgeon.load(tmp_path / "m").eval()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x64), converted(x64))


def test_cli_pool_choices_are_the_plan_kinds():
    from flexsurgeon.cli.main import convert as convert_command
    from flexsurgeon.layers.kinds import POOL_KINDS
    from flexsurgeon.surgery.plan import SurgeryPlan

    choices = next(p for p in convert_command.params if p.name == "pool").type.choices
    assert tuple(choices) == POOL_KINDS
    plan = flexsurgeon.inspect("resnet10t", img_size=64).plan
    with pytest.raises(flexsurgeon.errors.PlanError, match="pool 'max'"):
        SurgeryPlan.from_dict({**json.loads(plan.to_json()), "pool": "max"})


class _Terminal:
    """A stderr that says it is a terminal, so tqdm draws."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_names_each_step_on_a_terminal_and_nothing_elsewhere(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    flexsurgeon.convert("resnet18", img_size=64, num_classes=4, progress=True)
    for step in ("building resnet18 (step 0/4", "analysing at 64x64 and 128x128 (step 1/4",
                 "applying the plan (step 2/4", "checking that the outputs are unchanged (step 3/4"):
        assert step in terminal.text, terminal.text
    monkeypatch.undo()
    flexsurgeon.convert("resnet18", img_size=64, num_classes=4, progress=True)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name, kwargs, taps", [
    ("tv:swin_t", {}, ["features.3.1", "features.5.5"]),
    ("swin_tiny_patch4_window7_224", {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
     ["layers.1.blocks.0", "layers.2.blocks.0"]),
])
def test_sac_heads_on_a_channels_last_hierarchical_model_go_after_its_early_stages(name, kwargs, taps):
    """Swin's stages hand on (B, H, W, C) maps: heads after stages 1 and 2 (28x28, 14x14), as on a
    ResNet, not on the patch embedding."""
    source = (torchvision.models.swin_t(num_classes=5) if name.startswith("tv:")
              else timm.create_model(name, num_classes=5, **kwargs)).eval()
    model = flexsurgeon.convert(source, img_size=224)
    plan = model.flexsurgeon_plan
    assert [t.module for t in plan.sac] == taps and [t.size for t in plan.sac] == [(28, 28), (14, 14)]
    assert all(t.layout == "nhwc" for t in plan.sac)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _, heads = flexsurgeon.forward_with_sac(model, x)
    assert [h.shape for h in heads] == [(1, 5), (1, 5)]


def test_an_isotropic_cnn_gets_heads_on_its_blocks_at_one_and_two_thirds_of_the_depth():
    # ConvMixer keeps one map size after its stem: no stage ends where the resolution changes, so
    # its blocks are its stages (each block is a Sequential: the block's last child ends it)
    torch.manual_seed(0)
    model = flexsurgeon.convert(ConvMixer(dim=32, depth=6, kernel_size=3, patch_size=4, num_classes=5), img_size=64)
    assert [(t.module, t.size) for t in model.flexsurgeon_plan.sac] == [("blocks.1.3", (16, 16)),
                                                                        ("blocks.3.3", (16, 16))]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _, heads = flexsurgeon.forward_with_sac(model.train(), x)
    assert [h.shape for h in heads] == [(2, 5)] * 2
