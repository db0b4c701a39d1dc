"""What a conversion costs: parameters and multiply-adds, in inspect and convert."""
from __future__ import annotations

import json

import timm
import torch
from click.testing import CliRunner

import flexsurgeon
import flexsurgeon.surgery.costs
from flexsurgeon.cli.main import main


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_inspect_counts_parameters_of_both_models_and_each_added_module():
    found = flexsurgeon.inspect("resnet18", img_size=64, num_classes=4)
    costs, plan = found.costs, found.plan
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=4)
    assert costs.source.params == _numel(source)
    converted = flexsurgeon.convert(timm.create_model("resnet18", num_classes=4), img_size=64)
    assert costs.training.params == _numel(converted)
    assert costs.inference.params == _numel(converted) - _numel(converted.sac_heads)
    assert costs.inference.params == _numel(flexsurgeon.strip_sac_heads(converted))
    added = dict(costs.added)
    assert set(added) == {plan.pools[0].module, *(f"sac_heads.{t.node}" for t in plan.sac)}
    assert sum(c.params for c in added.values()) == costs.training.params - costs.source.params
    # FlexPool's weighted sum is C*H*W multiply-adds; a head adds its pool and its linear layer
    pool = plan.pools[0]
    assert added[pool.module].macs == pool.channels * pool.size[0] * pool.size[1]
    assert costs.inference.macs - costs.source.macs == added[pool.module].macs
    for tap in plan.sac:
        head = added[f"sac_heads.{tap.node}"]
        assert head.macs == tap.channels * (tap.size[0] * tap.size[1] + plan.num_classes)
    assert costs.training.macs - costs.inference.macs == sum(added[f"sac_heads.{t.node}"].macs for t in plan.sac)
    assert costs.source.macs > 100_000_000  # the convolutions are counted, not just the head


def test_inspect_json_and_convert_print_the_costs(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "resnet18", "--img-size", "64", "--num-classes", "4", "--json"])
    assert result.exit_code == 0, result.output
    costs = json.loads(result.output)["costs"]
    assert costs["training"]["params"] > costs["inference"]["params"] > costs["source"]["params"]
    result = runner.invoke(main, ["convert", "resnet18", "--random-init", "--img-size", "64", "--num-classes", "4",
                                  "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "converted, training (with SAC heads)" in result.output and "+ global_pool" in result.output
    assert f"{costs['source']['params']:,}" in result.output


def test_a_batchnorm_on_a_pooled_map_is_measured_before_the_save_and_changes_nothing(tmp_path):
    """Split attention (ResNeSt) pools to 1x1 and normalises that map: a train-mode forward of one
    image fails there, which once ended convert with an error after the folder was written."""
    runner = CliRunner()
    args = ["resnest14d", "--img-size", "64", "--num-classes", "4"]
    result = runner.invoke(main, ["inspect", *args])
    assert result.exit_code == 0, result.output
    assert "converted, training (with SAC heads)" in result.output
    out = tmp_path / "c"
    result = runner.invoke(main, ["convert", *args, "--random-init", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "converted, training (with SAC heads)" in result.output
    flexsurgeon.load(out)

    converted = flexsurgeon.convert(timm.create_model("resnest14d", num_classes=4), img_size=64)
    before = {name: b.clone() for name, b in converted.named_buffers()}
    flexsurgeon.surgery.costs.measure(timm.create_model("resnest14d", num_classes=4), converted)
    assert all(torch.equal(b, before[name]) for name, b in converted.named_buffers())
