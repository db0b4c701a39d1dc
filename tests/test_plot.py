"""flexsurgeon plot: weight maps, training curves and ablation plots as PNGs; errors in one line."""
import json
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.errors import PlotError
from flexsurgeon.layers.pools import FlexPool
from flexsurgeon.plotting.plot import plot_ablation, plot_folder, plot_training_curves
from flexsurgeon.plotting.weight_maps import flex_pools_of, plot_weight_maps, pool_weights, top_channels

pytest.importorskip("matplotlib")
PERTURBED = [5, 40, 17]  # channels of the main pool given peaked weights, strongest first


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _png(path, min_side=200, max_side=4000):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert all(min_side <= side <= max_side for side in image.size), image.size
        return image.size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = flexsurgeon.convert("resnet10t", img_size=64, num_classes=5)
    pool = model.global_pool
    with torch.no_grad():
        for strength, c in zip((6.0, 4.0, 2.0), PERTURBED):
            pool.weight[c, 0, 1] += strength  # softmax logits: one position stands out
        model.sac_heads["layer2_0_act2"].pool.weight.add_(0.5 * torch.randn(128, 8, 8))
    directory = tmp_path_factory.mktemp("plot") / "model"
    flexsurgeon.save(model, directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return flexsurgeon.load(model_dir)


def _record(epoch, heads=("sac:layer2_0_act2", "sac:layer3_0_act2", "main")):
    def split(base):
        return {"loss": {h: base / epoch + i for i, h in enumerate(heads)},
                "top1": {h: 20.0 * epoch - 5 * i for i, h in enumerate(heads)},
                "top5": {h: 60.0 for h in heads}, "count": 64}
    return {"epoch": epoch, "step": 3 * epoch, "lr": 0.01, "frozen_backbone": epoch == 1,
            "train": split(2.0), "val": split(2.5), "images_per_s": 100.0, "seconds": 1.0,
            "best_top1": 20.0 * epoch, "skipped_images": 0, "world_size": 1}


def _write_log(path, epochs=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(_record(e)) + "\n" for e in range(1, epochs + 1)))
    return path


RESULTS = """variant,seed,top1,top5,loss,best_top1,epochs,seconds
avg,0,70.0,90.0,1.1,70.5,2,10
avg,1,71.0,90.5,1.0,71.0,2,10
softmax,0,72.5,91.0,0.9,72.5,2,11
softmax,1,73.5,91.5,0.9,73.5,2,11
softmax,2,73.0,91.2,0.9,73.0,2,11
linear,0,71.5,90.8,1.0,71.5,2,11
"""


def test_weights_come_from_flexpools_own_path_and_the_perturbed_channels_are_on_top(model):
    pool = model.global_pool
    a = pool_weights(pool)
    assert a.shape == (512, 2, 2)
    torch.testing.assert_close(a.sum((1, 2)), torch.ones(512))  # softmax: each channel sums to one
    x = torch.randn(2, 512, 2, 2)
    torch.testing.assert_close((x * a).sum((2, 3)), pool.eval()(x).flatten(1))
    assert top_channels(a, 3) == PERTURBED
    assert top_channels(a, 10_000)[:3] == PERTURBED and len(top_channels(a, 10_000)) == 512
    linear = FlexPool(4, 3, pool="linear")
    with torch.no_grad():
        linear.weight[2, 1, 1] = -0.5
    torch.testing.assert_close(pool_weights(linear), linear.weight.detach())  # linear: the raw weights
    assert top_channels(pool_weights(linear), 1) == [2]


def test_weight_maps_one_png_per_flexpool_named_after_its_module(model, tmp_path):
    written = plot_weight_maps(model, tmp_path, top=4)
    assert [p.name for p in written] == ["weights-global_pool.png", "weights-sac-layer2_0_act2.png",
                                         "weights-sac-layer3_0_act2.png"]
    for path in written:
        _png(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_pools_that_are_not_flexpool_are_skipped(model):
    from torch import nn

    class Avg(nn.Module):  # stands in for an avg / LSE / SimPool baseline pool
        def forward(self, x):
            return x.mean((2, 3))

    saved = model.sac_heads["layer3_0_act2"].pool
    model.sac_heads["layer3_0_act2"].pool = Avg()
    try:
        assert [stem for stem, _, _ in flex_pools_of(model)] == ["weights-global_pool",
                                                                   "weights-sac-layer2_0_act2"]
    finally:
        model.sac_heads["layer3_0_act2"].pool = saved


def test_training_curves_from_a_log(tmp_path):
    log = _write_log(tmp_path / "run" / "log.jsonl")
    with open(log, "a") as handle:  # a resumed epoch 3 and an epoch being written
        handle.write(json.dumps(_record(3)) + "\n" + '{"epoch": 4, "tra')
    _png(plot_training_curves(log, tmp_path / "curves.png"))


def test_ablation_plot_from_rows_and_from_a_results_folder(tmp_path):
    rows = [{"variant": "avg", "seed": 0, "top1": 70.0}, {"variant": "softmax", "seed": 0, "top1": 72.0},
            {"variant": "softmax", "seed": 1, "top1": 73.0}]
    _png(plot_ablation(rows, tmp_path / "a.png"))
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "results.csv").write_text(RESULTS)
    code, output = _run("plot", tmp_path / "abl")
    assert code == 0, output
    assert output.strip() == f"wrote {tmp_path / 'abl' / 'plots' / 'accuracy.png'}"
    _png(tmp_path / "abl" / "plots" / "accuracy.png")
    for option in (["--top", "3"], ["--model-code", "net.py:build"]):  # weight-map options: no model here
        code, output = _run("plot", tmp_path / "abl", "-o", tmp_path / "other", *option)
        assert code == 1 and f"{option[0]} applies to FlexPool weight maps, and {tmp_path / 'abl'} holds no model" \
            in output and not (tmp_path / "other").exists(), output
    with pytest.raises(PlotError, match="row 1 .*top1 a number"):
        plot_ablation([{"variant": "avg", "seed": 0, "top1": "n/a"}], tmp_path / "b.png")


def test_plot_a_model_folder_and_a_run_folder_through_the_cli(model_dir, tmp_path):
    code, output = _run("plot", model_dir, "-o", tmp_path / "m", "--top", "3")
    assert code == 0, output
    assert len(output.splitlines()) == 3 and all(line.startswith("wrote ") for line in output.splitlines())
    run = tmp_path / "run"
    _write_log(run / "log.jsonl")
    (run / "best").symlink_to(model_dir, target_is_directory=True)
    written = plot_folder(run)
    assert [p.relative_to(run).as_posix() for p in written] == [
        "plots/curves.png", "plots/weights-global_pool.png", "plots/weights-sac-layer2_0_act2.png",
        "plots/weights-sac-layer3_0_act2.png"]


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "nothing to plot in {d}: it has no config.json (a model folder), log.jsonl"),
    (lambda d: (d / "log.jsonl").write_text(""), "log.jsonl has no finished epochs yet"),
    (lambda d: (d / "log.jsonl").write_text("{}\n{}\n"), "line 1 has no epoch with train/val loss"),
    (lambda d: (d / "results.csv").write_text("name,acc\nx,1\n"), "has no column variant, seed, top1"),
    (lambda d: (d / "ablation.json").write_text("{}"),
     "nothing to plot in {d} yet: no run of this ablation has finished (results.csv is written after each run)"),
])
def test_nothing_plottable_is_one_line(tmp_path, setup, message):
    setup(tmp_path)
    code, output = _run("plot", tmp_path)
    assert code == 1
    assert output.startswith("Error: ") and len(output.strip().splitlines()) == 1, output
    assert message.format(d=tmp_path) in output and "Traceback" not in output
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


@pytest.mark.parametrize("broken", ["best/config.json", "log.jsonl"])
def test_a_folder_with_one_unreadable_part_writes_no_png(model_dir, tmp_path, broken):
    """An ablation or run folder is read whole before anything is drawn: one bad part fails the
    command with one line and no PNG of the parts that were fine."""
    run = tmp_path / "run"
    _write_log(run / "log.jsonl")
    shutil.copytree(model_dir, run / "best")
    (run / "results.csv").write_text(RESULTS)
    (run / broken).write_text("{broken")
    code, output = _run("plot", run)
    assert code == 1 and len(output.strip().splitlines()) == 1 and f"{run / broken}" in output, output
    assert not (run / "plots").exists()


def test_without_matplotlib_the_cli_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "results.csv").write_text(RESULTS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    code, output = _run("plot", tmp_path)
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines() == [
        "Error: plotting needs matplotlib, which is not installed: pip install 'flexsurgeon[plot]'"]
    assert not (tmp_path / "plots").exists()


def test_a_token_models_pools_are_drawn_on_their_patch_grid(tmp_path):
    folder = tmp_path / "vit"
    result = CliRunner().invoke(main, ["convert", "vit_tiny_patch16_224", "--random-init", "--img-size", "64",
                                       "--num-classes", "4", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["plot", str(folder)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (folder / "plots").iterdir()) == [
        "weights-flex_pools.getitem.png", "weights-sac-add_16.png", "weights-sac-add_8.png"]
