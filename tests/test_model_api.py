"""The converted model is the source model: same class, same API, same hooks.

Each model is converted in place and compared with an unconverted copy holding the same
weights. FlexPool starts as exact average pooling, so everything before the pool is
bitwise equal and everything after it equal up to float rounding.
"""
from __future__ import annotations

import copy

import pytest
import timm
import timm.optim
import torch

import flexsurgeon
from flexsurgeon.layers.pools import FlexPool
from flexsurgeon.surgery.convert import PRESERVATION_TOLERANCE

# One model per timm family, the smallest variant; the last two have pools written as code
# (a head module's forward, the model's own forward), so they take the graph-rewrite path.
TIMM_MODELS = ["resnet18", "mobilenetv3_small_050", "convnext_atto", "regnetx_002", "ghostnet_050", "dla46_c",
               "mobilevit_xxs", "fastvit_t8", "hgnetv2_b0", "edgenext_xx_small", "cs3darknet_s", "efficientvit_b0",
               "mambaout_femto", "repvit_m0_9"]
REWRITTEN = {"mambaout_femto": ("head", "forward"), "repvit_m0_9": ("", "forward_head")}
# torchvision: (builder, three modules to hook); shufflenet pools with x.mean([2, 3]) in its forward
TV_MODELS = [("resnet18", ["conv1", "layer2.0.bn1", "layer4"]),
             ("mobilenet_v3_small", ["features.0.0", "features.4", "features.12"]),
             ("shufflenet_v2_x0_5", ["conv1", "stage3", "conv5"]),
             ("squeezenet1_1", ["features.0", "features.6", "classifier.1"])]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _close(got, expected):
    scale = max(1.0, expected.abs().max().item())
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= PRESERVATION_TOLERANCE * scale


def _pair(source):
    torch.manual_seed(0)
    source.eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=64)
    assert converted is source
    return reference, converted


def _hooked_outputs(model, paths):
    """What forward hooks on ``paths`` saw, kept (not copied) until after the forward."""
    seen, handles = {}, []
    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda module, args, out, path=path: seen.setdefault(path, []).append(out)))
    try:
        with torch.no_grad():
            model(X)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _check_hooks(reference, converted, paths):
    expected, got = _hooked_outputs(reference, paths), _hooked_outputs(converted, paths)
    assert set(got) == set(paths)  # every hook fired
    for path in paths:
        assert len(got[path]) == len(expected[path])
        assert all(torch.equal(g, e) for g, e in zip(got[path], expected[path])), path


def _hook_paths(model):
    """A stem layer, a middle stage and the last stage, from timm's feature_info."""
    first = next(name for name, m in model.named_modules() if name and not list(m.children())
                 and list(m.parameters()))
    stages = [info["module"] for info in model.feature_info]
    return [first, stages[len(stages) // 2], stages[-1]]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_keeps_its_class_methods_and_hooks(name):
    reference, converted = _pair(timm.create_model(name, num_classes=5))
    assert type(converted) is type(reference)
    plan = converted.flexsurgeon_plan
    (edit,) = plan.pools
    assert (edit.replacement, edit.module, edit.forward) == (
        ("graph_rewrite", *REWRITTEN[name]) if name in REWRITTEN else ("in_place", edit.module, "forward"))
    with torch.no_grad():
        features = converted.forward_features(X)
        assert torch.equal(features, reference.forward_features(X))
        _close(converted.forward_head(features, pre_logits=True), reference.forward_head(features, pre_logits=True))
        _close(converted.forward_head(features), reference.forward_head(features))
        _close(converted(X), reference(X))
        final, intermediates = converted.forward_intermediates(X)
        final_ref, intermediates_ref = reference.forward_intermediates(X)
        assert torch.equal(final, final_ref) and len(intermediates) == len(intermediates_ref)
        assert all(torch.equal(a, b) for a, b in zip(intermediates, intermediates_ref))
    _check_hooks(reference, converted, _hook_paths(reference))
    assert converted.pretrained_cfg["input_size"] == (3, 64, 64)
    assert timm.data.resolve_data_config(model=converted)["input_size"] == (3, 64, 64)
    assert converted.feature_info == reference.feature_info
    assert converted.get_classifier() is not None and converted.group_matcher() == reference.group_matcher()
    if hasattr(reference, "no_weight_decay"):
        assert converted.no_weight_decay() == reference.no_weight_decay()
    # timm's layer-wise learning-rate decay reads group_matcher; every parameter gets a group
    optimizer = timm.optim.create_optimizer_v2(converted, opt="sgd", lr=0.1, layer_decay=0.7)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in converted.parameters()}

    # grad checkpointing (where the family has it), then training steps: the main output alone,
    # then with the SAC heads
    try:
        reference.set_grad_checkpointing(True)
    except AssertionError:  # timm: "gradient checkpointing not supported" (dla, cspnet)
        pass
    else:
        converted.set_grad_checkpointing(True)
    converted.train()
    reference.train()
    torch.manual_seed(1)  # the same dropout masks in both
    converted(X).logsumexp(1).sum().backward()
    torch.manual_seed(1)
    reference(X).logsumexp(1).sum().backward()
    stem = _hook_paths(reference)[0]
    _close(converted.get_submodule(stem).weight.grad, reference.get_submodule(stem).weight.grad)
    converted.zero_grad(set_to_none=True)
    out, heads = flexsurgeon.forward_with_sac(converted, X)
    sum(w * o.logsumexp(1).sum() for w, o in zip(plan.sac_weights, [*heads, out])).backward()
    assert len(heads) == len(plan.sac) and all(h.shape == (2, 5) for h in heads)
    assert all(p.grad is not None for p in converted.sac_heads.parameters())
    pools = [m for m in converted.modules() if isinstance(m, FlexPool)]
    assert len(pools) == len(plan.pools) + len(plan.sac) and all(p.weight.grad is not None for p in pools)

    # a new classifier keeps FlexPool and re-heads the SAC heads
    converted.eval().reset_classifier(3)
    with torch.no_grad():
        assert converted(X).shape == (2, 3)
    assert sum(isinstance(m, FlexPool) for m in converted.modules()) == len(pools)
    assert converted.flexsurgeon_plan.num_classes == 3
    assert all(h.fc.out_features == 3 for h in converted.sac_heads.values())


@pytest.mark.parametrize("name, paths", TV_MODELS, ids=[n for n, _ in TV_MODELS])
def test_torchvision_model_keeps_its_class_and_hooks(name, paths):
    import torchvision

    reference, converted = _pair(torchvision.models.get_model(name, weights=None, num_classes=5))
    assert type(converted) is type(reference)
    with torch.no_grad():
        _close(converted(X), reference(X))
    _check_hooks(reference, converted, paths)
    converted.train()
    out, heads = flexsurgeon.forward_with_sac(converted, X)
    (out.sum() + sum(h.sum() for h in heads)).backward()
    assert all(p.grad is not None for p in converted.parameters() if p.requires_grad)


def test_a_hook_inside_a_module_fx_traces_through_still_fires():
    """convnext's stem LayerNorm2d: a module a graph-generated forward would have inlined."""
    reference, converted = _pair(timm.create_model("convnext_atto", num_classes=5))
    assert type(converted.stem[1]).__name__ == "LayerNorm2d"
    _check_hooks(reference, converted, ["stem.1", "stages.1.blocks.0.norm"])


@pytest.mark.slow  # ~20 s of compiling; the in-place form has the same checks in the default run (test_convert)
def test_compile_export_channels_last_and_deepcopy_on_a_rewritten_forward():
    reference, converted = _pair(timm.create_model("repvit_m0_9", num_classes=5))
    with torch.no_grad():
        expected = reference(X)
        _close(torch.compile(converted)(X), expected)
        channels_last = copy.deepcopy(converted).to(memory_format=torch.channels_last)
        _close(channels_last(X.contiguous(memory_format=torch.channels_last)), expected)
    _close(torch.export.export(converted, (X,)).module()(X), expected)


def test_distributed_data_parallel_trains_the_heads(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from flexsurgeon.training.loop import TrainForward

    _, converted = _pair(timm.create_model("resnet18", num_classes=5))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(TrainForward(converted.train()))
        out, heads = wrapped(X)
        (out.sum() + sum(h.sum() for h in heads)).backward()
        assert all(p.grad is not None for p in converted.parameters())
    finally:
        dist.destroy_process_group()
