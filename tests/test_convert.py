import copy
import json

import pytest
import timm
import torch

import flexsurgeon
from flexsurgeon.apply import FlexSurgeonModel
from flexsurgeon.errors import AnalysisError
from flexsurgeon.layers import FlexPool, SACHead


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
    assert added and all(k.startswith(("flex_pools.", "sac_heads.")) for k in added)
    # original weights load into the converted model with only the new keys missing
    result = converted.load_state_dict(original, strict=False)
    assert set(result.missing_keys) == added and not result.unexpected_keys


def test_train_mode_forward_returns_main_logits_and_forward_train_adds_heads(resnet, x64):
    _, converted = resnet
    converted.train()
    try:
        out = converted(x64)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
        logits, heads = converted.forward_train(x64)
        assert logits.shape == (2, 10)
        assert [h.shape for h in heads] == [(2, 10), (2, 10)]
        loss = sum(w * torch.nn.functional.cross_entropy(o, torch.tensor([1, 2]))
                   for w, o in zip(converted.sac_weights, [*heads, logits]))
        loss.backward()
        for name in converted.new_parameter_names():
            assert converted.get_parameter(name).grad is not None, name
    finally:
        converted.zero_grad(set_to_none=True)
        converted.eval()


def test_new_layers_are_flexpool_and_sac_heads_sized_from_the_plan(resnet):
    _, converted = resnet
    plan = converted.flexsurgeon_plan
    pool = converted.flex_pools[plan.pools[0].node]
    assert isinstance(pool, FlexPool) and tuple(pool.weight.shape) == (512, 2, 2)
    heads = [converted.sac_heads[t.node] for t in plan.sac]
    assert all(isinstance(h, SACHead) for h in heads)
    assert [t.module for t in plan.sac] == ["layer2.1.act2", "layer3.1.act2"]
    assert plan.sac_weights == (0.1, 0.2, 0.7)


def test_timm_attributes_survive(resnet):
    reference, converted = resnet
    assert converted.num_classes == 10
    assert converted.num_features == reference.num_features
    assert converted.feature_info == reference.feature_info
    assert converted.pretrained_cfg["input_size"] == (3, 64, 64)
    assert timm.data.resolve_data_config(model=converted)["input_size"] == (3, 64, 64)


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
        next(iter(clone.flex_pools.values())).weight.add_(1.0)  # a softmax shift: output unchanged
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
    assert plan.pool_mode == "linear" and plan.dropout == 0.25
    assert [t.node for t in plan.sac] == ["layer3_1_act2"] and plan.sac_weights == (0.3, 0.7)
    assert converted.regularizer().item() == pytest.approx(0.0, abs=1e-8)  # weights start summing to one
    with torch.no_grad():
        converted.flex_pools[plan.pools[0].node].weight.mul_(2)
    assert converted.regularizer().item() > 0


def test_no_sac_heads_when_asked():
    converted = flexsurgeon.convert("resnet18", img_size=64, sac_stages=[])
    assert converted.flexsurgeon_plan.sac == () and len(converted.sac_heads) == 0
    logits, heads = converted.forward_train(torch.randn(2, 3, 64, 64))
    assert heads == []


def test_gating_pools_are_kept_unless_asked():
    plain = flexsurgeon.convert("mobilenetv3_small_100", img_size=64, sac_stages=[])
    gating = flexsurgeon.convert("mobilenetv3_small_100", img_size=64, sac_stages=[], replace_gating=True)
    assert len(plain.flexsurgeon_plan.pools) == 1
    assert len(gating.flexsurgeon_plan.pools) == 10


def test_model_without_a_spatial_pool_gets_a_reason():
    with pytest.raises(AnalysisError, match="the model pools tokens"):
        flexsurgeon.convert("vit_tiny_patch16_224", img_size=224)


def test_one_by_one_final_map_is_refused():
    with pytest.raises(AnalysisError, match="already 1x1"):
        flexsurgeon.convert("resnet18", img_size=32)


def test_isinstance_and_rebuild_from_a_timm_instance():
    converted = flexsurgeon.convert(timm.create_model("resnet18", num_classes=6), img_size=64)
    assert isinstance(converted, FlexSurgeonModel)
    assert converted.flexsurgeon_plan.source.name == "resnet18"
    assert converted.flexsurgeon_plan.source.kwargs["num_classes"] == 6


def test_avg_kind_keeps_the_function_and_adds_no_pool_parameters(x64):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=5).eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=64, pool="avg").eval()
    with torch.no_grad():
        assert (reference(x64) - converted(x64)).abs().max().item() <= 1e-5
    assert not list(converted.flex_pools.parameters())
    # the SAC heads pool by averaging too: a head's output is its Linear on the stage's mean
    tap = converted.flexsurgeon_plan.sac[0]
    head = converted.sac_heads[tap.node]
    feature = torch.randn(2, tap.channels, *tap.size)
    assert torch.allclose(head(feature), head.fc(feature.mean((2, 3))), atol=1e-6)


@pytest.mark.parametrize("kind, module", [("lse", "LsePlus2d"), ("simpool", "SimPool2d")])
def test_timm_baseline_pools_install_train_and_round_trip(kind, module, tmp_path, x64):
    torch.manual_seed(0)
    converted = flexsurgeon.convert("resnet10t", img_size=64, num_classes=5, pool=kind, sac_stages=[])
    pool = next(iter(converted.flex_pools.values()))
    assert type(pool.pool).__name__ == module
    new = converted.new_parameter_names()
    assert new and all(n.startswith("flex_pools.") for n in new)
    converted.train()
    out, heads = converted.forward_train(x64)
    out.sum().backward()
    assert pool.pool.parameters().__next__().grad is not None and heads == []
    flexsurgeon.save(converted, tmp_path / "m")
    loaded = flexsurgeon.load(tmp_path / "m").eval()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x64), converted(x64))


def test_cli_pool_choices_are_the_plan_kinds():
    from flexsurgeon.cli import convert as convert_command
    from flexsurgeon.plan import SurgeryPlan
    from flexsurgeon.pool_kinds import POOL_KINDS

    choices = next(p for p in convert_command.params if p.name == "pool").type.choices
    assert tuple(choices) == POOL_KINDS
    plan = flexsurgeon.inspect("resnet10t", img_size=64).plan
    with pytest.raises(flexsurgeon.errors.PlanError, match="pool_mode 'max'"):
        SurgeryPlan.from_dict({**json.loads(plan.to_json()), "pool_mode": "max"})


def test_residual_adds_write_in_place_only_without_autograd(x64):
    """fx turns ``x += shortcut`` into a new tensor per block; the eval graph adds in place again
    under no_grad, and gradients still flow (out of place) when autograd records."""
    from flexsurgeon.apply import add_into

    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=10).eval()
    converted = flexsurgeon.convert(copy.deepcopy(source), img_size=64).eval()
    adds = [n for n in converted._graphs["eval"].nodes if n.target is add_into]
    assert len(adds) == 8  # resnet18: one per basic block
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    with torch.no_grad():
        assert add_into(a, b) is a
        assert (converted(x64) - source(x64)).abs().max().item() <= 1e-5
    assert add_into(torch.randn(2, 3), torch.randn(2, 3)) is not a  # autograd on: a new tensor
    assert add_into(torch.randn(3), torch.randn(2, 3)).shape == (2, 3)  # broadcasting grows: not in place
    xs, xc = x64.clone().requires_grad_(True), x64.clone().requires_grad_(True)
    source(xs).sum().backward()
    converted(xc).sum().backward()
    assert torch.allclose(xs.grad, xc.grad, atol=1e-6)


def test_converted_model_frees_activations_when_the_source_does(resnet, x64):
    """eager holds a stage's input until the stage returns (``x = self.layer1(x)``); fx's code
    would free it after its last use inside the first block. The converted model keeps the
    source's lifetimes, which kept glibc from returning and re-faulting memory (5% on CPU)."""
    import weakref

    reference, converted = resnet

    def stage_input_alive_in_last_block(model) -> bool:
        seen, alive = {}, []
        hooks = [model.maxpool.register_forward_hook(lambda m, i, out: seen.update(ref=weakref.ref(out))),
                 model.layer1[-1].conv1.register_forward_pre_hook(lambda m, i: alive.append(seen["ref"]() is not None))]
        try:
            with torch.no_grad():
                model(x64)
        finally:
            for hook in hooks:
                hook.remove()
        return alive == [True]

    assert stage_input_alive_in_last_block(reference)
    assert stage_input_alive_in_last_block(converted)


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
