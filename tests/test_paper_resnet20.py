"""The paper's own network (benchmarks/paper_resnet20.py) and a one-epoch smoke of its ablation."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.commands.ablate import parse_variants
from flexsurgeon.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FACTORY = f"{ROOT / 'benchmarks' / 'paper_resnet20.py'}:resnet20"
RECIPE = ROOT / "benchmarks" / "paper_resnet20.yaml"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _module():
    spec = importlib.util.spec_from_file_location("paper_resnet20", ROOT / "benchmarks" / "paper_resnet20.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _conv_bn(cin, cout):  # a 3x3 convolution with bias, then BatchNorm's weight and bias
    return 9 * cin * cout + cout + 2 * cout


def test_resnet20_shapes_and_parameter_count():
    model = _module().resnet20().eval()
    expected = _conv_bn(1, 16)
    cin = 16
    for cout in (16, 32, 64):
        for block in range(3):
            expected += _conv_bn(cin if block == 0 else cout, cout) + _conv_bn(cout, cout)
        cin = cout
    expected += 64 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 64, 7, 7)
        assert model(x).shape == (2, 10)
        # option A shortcut: no parameters, the new channels are zero
        assert model.layer2[0].shortcut(torch.ones(1, 16, 28, 28))[0, :8].abs().sum() == 0
        assert model.layer2[0].shortcut(torch.ones(1, 16, 28, 28)).shape == (1, 32, 14, 14)
    # the pooled map is a BatchNorm output (conv, ReLU, then BN), so it is not clipped at zero
    assert (model.train().forward_features(x) < 0).any()
    three_channels = _module().resnet20(num_classes=100, in_chans=3)
    assert three_channels(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_convert_finds_the_pool_after_stage_3_and_taps_after_stages_1_and_2():
    model = _module().resnet20()
    converted = flexsurgeon.convert(model, img_size=28, in_chans=1)
    plan = converted.flexsurgeon_plan
    assert [(p.module, p.replacement, p.channels, p.size) for p in plan.pools] == [
        ("global_pool", "in_place", 64, (7, 7))]
    assert [(t.module, t.channels, t.size) for t in plan.sac] == [("layer1.2.bn2", 16, (28, 28)),
                                                                  ("layer2.2.bn2", 32, (14, 14))]
    assert plan.sac_weights == (0.1, 0.2, 0.7)


def test_the_ablation_recipe_and_variants_are_the_papers_columns():
    recipe = load_recipe(str(RECIPE))
    assert (recipe.img_size, recipe.sched, recipe.lr, recipe.sac_weights) == (28, "onecycle", 0.1, [0.1, 0.2, 0.7])
    variants = {v.name: v for v in parse_variants(",".join(_module().PAPER_VARIANTS))}
    assert len(variants) == 8 and sum(v.sac for v in variants.values()) == 4
    assert variants["flex-linear+dropout"].pool == "linear" and variants["flex-linear+dropout"].dropout == 0.25
    assert variants["flex"].pool == "softmax" and variants["avg"].pool == "avg"


def _idx_subset(out: Path, train: int, test: int) -> Path:
    """The first items of the packaged Fashion-MNIST, written back as an IDX folder (a smoke-sized copy)."""
    from flexsurgeon.data.idx import read_idx

    out.mkdir()
    for split, count in (("train", train), ("t10k", test)):
        for kind, magic in (("images", 0x0803), ("labels", 0x0801)):
            dims = "idx3" if kind == "images" else "idx1"
            array = read_idx(FASHION / f"{split}-{kind}-{dims}-ubyte.gz")[:count]
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (out / f"{split}-{kind}-{dims}-ubyte").write_bytes(header + array.astype("uint8").tobytes())
    return out


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_one_epoch_smoke_of_the_ablation_on_a_subset(tmp_path):
    """The documented ablation command, cut to one epoch, two variants and one seed on 512 + 256 items."""
    data = _idx_subset(tmp_path / "fashion", train=512, test=256)
    out = tmp_path / "ablation"
    result = CliRunner().invoke(main, [
        "ablate", FACTORY, "--random-init", "--in-chans", "1", "--data", str(data), "--recipe", str(RECIPE),
        "--set", "epochs=1", "--variants", "avg,flex-linear+dropout+sac", "--seeds", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["avg", "flex-linear+dropout+sac"]
    assert all(0 <= float(r["top1"]) <= 100 and float(r["loss"]) > 0 for r in rows), rows
    assert "| flex-linear+dropout+sac | 1 |" in (out / "summary.md").read_text()


def test_the_schedules_figure_reads_both_ablations_records(tmp_path):
    """benchmarks/paper_resnet20_schedules.py on the committed records: the 2-epoch table is the
    one RESULTS.md shows (AvgPool 88.00 +- 0.47 over 3 seeds), and the figure is written."""
    import subprocess
    import sys

    out = tmp_path / "schedules.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_resnet20_schedules.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    short, long = done.stdout.split("## 10 epochs")
    long, by_epoch = long.split("## top-1 after each epoch")
    # the per-epoch rows RESULTS.md shows, from each run's top1_by_epoch
    assert "| avg, seed 0 | 79.79 / 84.77 / 86.57 / 89.38 / 89.94 / **90.88** |" in by_epoch
    assert "| avg | 3 | 88.00 | 0.47 | (baseline) |" in short
    assert "| flex-linear+sac | 3 | 88.25 | 0.14 | +0.24 | [-0.71, +1.20] |" in short
    assert all(f"| {v} |" in long for v in ("avg", "avg+sac", "flex-linear+sac", "flex-linear+dropout+sac"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
