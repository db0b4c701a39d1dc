"""Token models: FlexPool over tokens in place of a mean or a class token, SAC heads on blocks."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from timm.models import group_parameters
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from timm.optim import create_optimizer_v2

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.layers.token_pool import TokenFlexPool

SMALL = {"img_size": 32, "num_classes": 5}
# (timm name, builder arguments, what the head pools: the start TokenFlexPool must equal)
MODELS = {
    "vit class token": ("vit_tiny_patch16_224", {"depth": 3}, [("token", 0)]),
    "vit mean": ("vit_tiny_patch16_224", {"depth": 3, "global_pool": "avg"}, [("mean", 1, 5)]),
    "deit distilled": ("deit_tiny_distilled_patch16_224", {"depth": 3}, [("token", 0), ("token", 1)]),
    "mixer": ("mixer_s16_224", {}, [("mean", 0, 4)]),
    "eva02 mean": ("eva02_tiny_patch14_224", {"depth": 3, "img_size": 28}, [("mean", 1, 5)]),
    "levit (hierarchical)": ("levit_128s", {"img_size": 128, "depth": (1, 1, 1)}, [("mean", 0, 4)]),
}


def _source(case):
    name, kwargs, _ = MODELS[case]
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kwargs}).eval()


def _x(size=32, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(MODELS))
def test_a_token_model_converts_in_place_with_its_outputs_and_timms_api_kept(case):
    source = _source(case)
    size = {**SMALL, **MODELS[case][1]}["img_size"]
    x = _x(size)
    with torch.no_grad():
        want, features = source(x), source.forward_features(x)
        pre_logits = source.forward_head(features, pre_logits=True)
    model = flexsurgeon.convert(_source(case), img_size=size)
    assert type(model) is type(source)
    pools = [m for m in model.modules() if isinstance(m, TokenFlexPool)]
    plan = model.flexsurgeon_plan
    assert [tuple(p.start) for p in plan.pools] == MODELS[case][2] and len(pools) == len(plan.pools) + len(plan.sac)
    assert all(p.layout == "tokens" and p.replacement == "graph_rewrite" for p in plan.pools)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_features(x), features, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), pre_logits, rtol=0, atol=1e-5)
        out, heads = flexsurgeon.forward_with_sac(model, x)
    assert [h.shape for h in heads] == [(2, 5)] * len(plan.sac) and len(plan.sac) == 2
    assert all(t.layout == "tokens" and t.module.startswith(("blocks.", "stages.")) for t in plan.sac)


def test_sac_heads_go_after_the_blocks_at_one_and_two_thirds_of_the_depth():
    model = flexsurgeon.convert(timm.create_model("vit_tiny_patch16_224", depth=12, **SMALL), img_size=32)
    assert [t.module for t in model.flexsurgeon_plan.sac] == ["blocks.3", "blocks.7"]
    assert flexsurgeon.inspect(timm.create_model("vit_tiny_patch16_224", depth=12, **SMALL), img_size=32,
                               sac_stages=["blocks.5"]).plan.sac[0].module == "blocks.5"


def test_the_class_token_pool_learns_from_its_first_step():
    model = flexsurgeon.convert(_source("vit class token"), img_size=32).train()
    pool = next(m for m in model.modules() if isinstance(m, TokenFlexPool))
    before = pool.pooling_weights().detach().clone()
    assert torch.equal(before[:, 0], torch.ones(before.shape[0]))  # all weight on the class token
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out, heads = flexsurgeon.forward_with_sac(model, _x())
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 3])).backward()
    optimizer.step()
    change = (pool.pooling_weights() - before).abs().amax().item()
    assert change > 1e-4, change


def test_inspect_says_what_each_token_pool_reads():
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "5"])
    assert result.exit_code == 0, result.output
    assert "192 x 17 tokens: class token 0 of 17" in result.output
    assert "output of blocks.3" in result.output and "output of blocks.7" in result.output
    # one name for where the pool is: the head's code (its node in the head's own graph is
    # another name than in the whole model's), and the blocks the stages end, with their token counts
    assert "replace the pool at forward_head (graph rewrite) with" in result.output
    pools, stages = (result.output.split(title)[1].split("\n\n")[0].splitlines()[2:]
                     for title in ("global pools:", "stages:"))
    assert [row.split()[1] for row in pools] == ["forward_head"], pools
    assert [row.split()[2:6] for row in stages[:2]] == [["blocks.0", "192", "17", "tokens"],
                                                        ["blocks.1", "192", "17", "tokens"]], stages
    mixer = runner.invoke(main, ["inspect", "mixer_s16_224", "--img-size", "64", "--json"])
    pool = json.loads(mixer.output)["plan"]["pools"][0]
    assert (pool["layout"], pool["start"], pool["grid"]) == ("tokens", ["mean", 0, 16], [4, 4])
    assert "mean over all 16 tokens (4x4 grid)" in runner.invoke(main, ["inspect", "mixer_s16_224", "--img-size",
                                                                        "64"]).output


# the Mixer and LeViT round trips take 6 and 10 s (LeViT's ONNX export): in the slow set, to keep the
# default run short; every family's conversion is in the default run above
ACCEPTANCE = ["vit class token", "vit mean", pytest.param("mixer", marks=pytest.mark.slow),
              pytest.param("levit (hierarchical)", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", ACCEPTANCE)
def test_a_converted_token_model_keeps_timms_api_round_trips_exports_and_fine_tunes(case, tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    source = _source(case)
    size = {**SMALL, **MODELS[case][1]}["img_size"]
    x = _x(size)
    model = flexsurgeon.convert(_source(case), img_size=size)
    with torch.no_grad():
        want = model(x)
        if hasattr(source, "forward_intermediates"):  # timm's feature API reads the same blocks
            for got, expected in zip(model.forward_intermediates(x, intermediates_only=True),
                                     source.forward_intermediates(x, intermediates_only=True), strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        model.set_grad_checkpointing(False)
    pools = {n for n, _ in model.named_parameters() if n.startswith("flex_pools.")}
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert pools and pools <= set(groups[max(groups)])  # the head's group, with the classifier
    folder = flexsurgeon.save(model, tmp_path / "model")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(loaded) is type(source)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(folder), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() < 1e-4

    run = tmp_path / "run"  # one smoke epoch with SAC heads, on 3 classes: the head is reset, the pools kept
    result = runner.invoke(main, ["finetune", str(folder), "--data", "synthetic:classes=3,train=16,val=8",
                                  "--recipe", "smoke", "--epochs", "1", "--set", "freeze_epochs=0",
                                  "--num-classes", "3", "-o", str(run)])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and len([h for h in log[-1]["val"]["top1"] if h.startswith("sac:")]) == 2
    tuned = flexsurgeon.load(run / "last")
    assert type(tuned) is type(source) and tuned.num_classes == 3 and tuned(x).shape == (2, 3)
    assert [tuple(p.start) for p in tuned.flexsurgeon_plan.pools] == MODELS[case][2]


def test_a_token_model_fine_tunes_with_sac_heads_through_the_cli(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "vit_tiny_patch16_224", "--random-init", "--img-size", "32",
                                       "--data", "synthetic:classes=3,train=32,val=16", "--recipe", "smoke",
                                       "--set", "freeze_epochs=0", "-o", str(run)])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sorted(log[-1]["val"]["top1"]) == ["main", "sac:add_16", "sac:add_8"]
    loaded = flexsurgeon.load(run / "best")
    assert loaded.flexsurgeon_plan.pools[0].start == ("token", 0)


@pytest.mark.parametrize("case, pool, preserved", [("vit class token", "token", True), ("vit mean", "avg", True),
                                                   ("vit class token", "avg", False)])
def test_the_fixed_baselines_avg_and_token_read_what_they_say(case, pool, preserved):
    source, x = _source(case), _x()
    model = flexsurgeon.convert(_source(case), img_size=32, pool=pool)
    assert type(model) is type(source) and not list(model.flexsurgeon_plan.pools) == []
    assert not [n for n, _ in model.named_parameters() if "pool" in n and not n.startswith("sac_heads.")]
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        want = tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(1)  # the class token / the patch tokens' mean
        torch.testing.assert_close(pooled, model.fc_norm(want), rtol=0, atol=1e-6)  # fc_norm: a mean-pooled ViT's
        same = torch.allclose(model(x), source(x), rtol=0, atol=1e-5)
    assert same is preserved
    heads = flexsurgeon.forward_with_sac(model.train(), x)[1]  # the heads of a baseline: the plain mean of all tokens
    assert len(heads) == 2 and all(h.shape == (2, 5) for h in heads)


def test_a_pool_for_the_other_form_is_refused_in_one_line():
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"^pool 'token' reads one token .* spatial map"):
        flexsurgeon.convert(timm.create_model("resnet10t", num_classes=5), img_size=64, pool="token")
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"^pool 'lse' does not take token sequences"):
        flexsurgeon.convert(_source("vit class token"), img_size=32, pool="lse")
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"^pool 'token' reads the class token.*has none"):
        flexsurgeon.convert(_source("mixer"), img_size=32, pool="token")


def test_token_pools_join_the_class_token_in_the_head_group_and_out_of_weight_decay(tmp_path):
    model = flexsurgeon.convert(_source("vit class token"), img_size=32)
    pools = {n for n, _ in model.named_parameters() if ".pool." in n or n.startswith("flex_pools.")}
    assert len(pools) == 4  # the head pool's weight and gamma, and each SAC head's pool weight
    assert pools | {"cls_token", "pos_embed"} <= model.no_weight_decay()
    groups = group_parameters(model, model.group_matcher(coarse=False))
    head = groups[max(groups)]
    assert "head.weight" in head and {n for n in pools if n.startswith("flex_pools.")} <= set(head)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {n for n, p in model.named_parameters() for group in optimizer.param_groups
               if group["weight_decay"] > 0 and any(p is q for q in group["params"])}
    assert not pools & decayed and "head.weight" in decayed
    loaded = flexsurgeon.load(flexsurgeon.save(model, tmp_path / "vit"))
    assert pools <= loaded.no_weight_decay()


def test_a_hierarchical_token_models_heads_go_at_its_stage_ends_past_its_position_convolutions():
    # Twins' position convolution views the tokens as (B, C, N) inside its first block of a stage:
    # that view must not split the stage (it once put a head on the first block of the last stage)
    source = timm.create_model("twins_pcpvt_small", depths=(1, 2, 2, 1), img_size=64, num_classes=5)
    assert [t.module for t in flexsurgeon.inspect(source, img_size=64).plan.sac] == ["blocks.1.1", "blocks.2.1"]


def test_torchvisions_vit_gets_heads_on_its_encoder_layers():
    # torchvision names its blocks encoder.layers.encoder_layer_N, not blocks.N
    torch.manual_seed(0)
    source = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=6, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=5)
    model = flexsurgeon.convert(source, img_size=32)
    assert [t.module for t in model.flexsurgeon_plan.sac] == ["encoder.layers.encoder_layer_1",
                                                              "encoder.layers.encoder_layer_3"]
    _, heads = flexsurgeon.forward_with_sac(model.train(), _x(32))
    assert [h.shape for h in heads] == [(2, 5)] * 2


def _small_mvitv2():
    torch.manual_seed(0)
    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 2, 1), embed_dim=16, num_heads=1), img_size=(64, 64),
                         num_classes=5)


def test_a_block_that_returns_a_tuple_gets_its_sac_head_on_the_tokens_in_it(tmp_path):
    # MViTv2's blocks return (tokens, feat_size): a head reads element 0 of the last block of stages 2 and 3
    model = flexsurgeon.convert(_small_mvitv2(), img_size=64)
    plan = model.flexsurgeon_plan
    assert [(t.module, t.read, t.channels, t.size) for t in plan.sac] == [
        ("stages.1.blocks.0", "output[0]", 32, (1, 64)), ("stages.2.blocks.1", "output[0]", 64, (1, 16))]
    x = _x(64)
    out, heads = flexsurgeon.forward_with_sac(model.train(), x)
    assert out.shape == (2, 5) and [h.shape for h in heads] == [(2, 5)] * 2
    sum(h.logsumexp(1).sum() for h in heads).backward()  # the heads alone train the blocks they read
    assert all(p.grad is not None for p in model.stages[1].parameters())
    assert all(p.grad is None for p in model.stages[3].parameters())
    loaded = flexsurgeon.load(flexsurgeon.save(model, tmp_path / "mvitv2"), model=_small_mvitv2())
    assert loaded.flexsurgeon_plan == plan
    with torch.no_grad():
        for got, want in zip(flexsurgeon.forward_with_sac(loaded.eval(), x)[1],
                             flexsurgeon.forward_with_sac(model.eval(), x)[1]):
            torch.testing.assert_close(got, want)


def test_no_sac_head_reads_a_tensor_that_folds_positions_into_the_batch():
    # TNT's inner stream is (B * patches, 16, C) and its blocks return it beside the patch tokens
    source = timm.create_model("tnt_s_patch16_224", depth=2, img_size=32, num_classes=5)
    model = flexsurgeon.convert(source, img_size=32)
    assert not any(t.module.startswith("pixel_embed") for t in model.flexsurgeon_plan.sac)
    _, heads = flexsurgeon.forward_with_sac(model.train(), _x(32))
    assert all(h.shape == (2, 5) for h in heads)


def test_costs_count_a_class_attention_model_and_list_its_token_pool():
    # CaiT passes its class token on without a grad_fn, which torch's FLOP counter once failed on
    source = timm.create_model("cait_xxs24_224", depth=2, img_size=32, num_classes=5)
    costs = flexsurgeon.inspect(source, img_size=32).costs
    added = dict(costs.added)
    assert costs.inference.macs > 0 and any(n.startswith("flex_pools.") for n in added)
    assert all(n.startswith(("flex_pools.", "sac_heads.")) and c.params > 0 for n, c in added.items())


@pytest.mark.slow  # about 10 s: CoaT traces slowly (run with -m slow)
def test_a_head_that_mixes_the_class_tokens_of_several_streams_gets_one_flexpool_per_stream(tmp_path):
    """CoaT stacks the class tokens of its three streams and mixes them in its head: each read is
    a head pool (not a query going back into tokens), becomes a FlexPool of its own stream, and
    the outputs and the saved folder stay the model's."""
    def source():
        torch.manual_seed(0)
        return timm.create_model("coat_tiny", serial_depths=(1, 1, 1, 1), parallel_depth=1,
                                 **{**SMALL, "img_size": 64}).eval()

    x = _x(64)
    model = flexsurgeon.convert(source(), img_size=64)
    plan = model.flexsurgeon_plan
    assert [(p.size, tuple(p.start)) for p in plan.pools] == [((1, 65), ("token", 0)), ((1, 17), ("token", 0)),
                                                               ((1, 5), ("token", 0))]
    with torch.no_grad():
        want = source()(x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
        flexsurgeon.save(model, tmp_path / "coat")
        torch.testing.assert_close(flexsurgeon.load(tmp_path / "coat")(x), want, rtol=0, atol=1e-5)


def test_a_class_token_is_found_where_the_patch_size_is_one_int():
    """XCiT gives its patch size as one int: its class token and patch grid are still found, so
    ``pool='token'`` reads the class token and ``avg`` the patch tokens. (At depth 2 one default
    SAC head sits on a map of the patch embedding: the 'token' baseline's head averages it.)"""
    def source():
        torch.manual_seed(0)
        return timm.create_model("xcit_nano_12_p16_224", depth=2, **SMALL).eval()

    x = _x()
    with torch.no_grad():
        want = source()(x)
        tokens = source().forward_features(x)
    for pool in ("token", "avg"):
        model = flexsurgeon.convert(source(), img_size=32, pool=pool)
        edit = model.flexsurgeon_plan.pools[0]
        assert (edit.prefix, tuple(edit.grid), tuple(edit.start)) == (1, (2, 2), ("token", 0))
        with torch.no_grad():
            if pool == "avg":
                torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
            else:
                torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
