"""`flexsurgeon eval`: per-head scores on the val split, for checkpoints and plain model names."""
import json

import pytest
import timm
import torch
from click.testing import CliRunner

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.commands.evaluate import evaluate_source
from flexsurgeon.data import load_data
from flexsurgeon.data.loaders import make_loader
from flexsurgeon.runs.layout import checkpoint_folder
from flexsurgeon.training.metrics import Tally, one_class_note

DATA = "synthetic:classes=4,train=32,val=40"


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = flexsurgeon.convert("resnet10t", img_size=64, num_classes=4)
    with torch.no_grad():  # a classifier that is not uniform, so accuracy means something
        model.fc.weight.normal_()
    return flexsurgeon.save(model, tmp_path_factory.mktemp("eval") / "model")


def _reference_scores(model, data_spec):
    from timm.data import resolve_data_config

    data = load_data(data_spec, data_config=resolve_data_config(model=model), in_chans=3)
    loader = make_loader(data.val, batch_size=7, train=False, seed=0)
    model.eval()
    hits, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            hits += (out.argmax(1) == y).sum().item()
            loss += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
            n += len(y)
    return 100.0 * hits / n, loss / n, n


def test_scores_every_head_and_main_matches_a_direct_count(converted_dir):
    scores = evaluate_source(str(converted_dir), DATA, batch_size=16, workers=0, device="cpu", progress=False)
    plan = flexsurgeon.load(converted_dir).flexsurgeon_plan
    assert list(scores["heads"]) == [f"sac:{t.node}" for t in plan.sac] + ["main"]
    top1, loss, n = _reference_scores(flexsurgeon.load(converted_dir), DATA)
    main_scores = scores["heads"]["main"]
    assert scores["count"] == n == 40
    assert main_scores["top1"] == pytest.approx(top1)
    assert main_scores["loss"] == pytest.approx(loss, rel=1e-5)
    for head in scores["heads"].values():
        assert 0 <= head["top1"] <= head["top5"] == 100.0  # 4 classes: the top 5 always hold the label


def test_a_run_folder_means_its_best_checkpoint(tmp_path, converted_dir):
    import shutil

    shutil.copytree(converted_dir, tmp_path / "run" / "best")
    assert checkpoint_folder(tmp_path / "run") == tmp_path / "run" / "best"
    with pytest.raises(flexsurgeon.errors.CheckpointError, match="holds no checkpoint"):
        checkpoint_folder(tmp_path)


def test_cli_table_and_json_for_a_folder_and_a_plain_model_name(converted_dir):
    runner = CliRunner()
    table = runner.invoke(main, ["eval", str(converted_dir), "--data", DATA, "--workers", "0"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert "40 val images" in lines[0] and lines[1].split() == ["head", "top-1", "top-5", "loss"]
    assert [line.split()[0] for line in lines[2:]][-1] == "main" and len(lines) == 5  # two SAC heads + main
    plain = runner.invoke(main, ["eval", "resnet10t", "--random-init", "--num-classes", "4", "--img-size", "64",
                                 "--data", DATA, "--workers", "0", "--json"])
    assert plain.exit_code == 0, plain.output
    scores = json.loads(plain.stdout)
    assert scores["model"] == "resnet10t" and list(scores["heads"]) == ["main"] and scores["count"] == 40


@pytest.mark.parametrize("args, message", [
    (["resnet10t", "--random-init", "--num-classes", "3", "--img-size", "64"], "has 3 classes but the data has 4"),
    (["resnet10t", "--random-init", "--img-size", "64"], "resnet10t has 1000 classes but the data has 4; evaluate"),
    (["{five}"], "has 5 classes but the data has 4; evaluate a model fine-tuned on these classes"),
    (["runs/nothing"], "no such checkpoint folder: runs/nothing"),
    (["resnt10t"], "unknown model 'resnt10t'; did you mean"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    if args == ["{five}"]:  # a folder converted for 5 classes, scored against 4-class data
        flexsurgeon.save(flexsurgeon.convert("resnet10t", img_size=64, num_classes=5), tmp_path / "five")
        args = [str(tmp_path / "five")]
    result = CliRunner().invoke(main, ["eval", *args, "--data", DATA, "--workers", "0"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option", [["--num-classes", "7"], ["--img-size", "128"], ["--in-chans", "1"],
                                    ["--random-init"], ["--weights", "w.safetensors"]])
def test_options_for_a_model_name_are_refused_for_a_checkpoint(option, converted_dir):
    # a checkpoint has its own classes, input size, channels and weights: an option that would change
    # one of them cannot take effect, so it is refused rather than ignored
    result = CliRunner().invoke(main, ["eval", str(converted_dir), "--data", DATA, "--workers", "0", *option])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    name = "--weights/--random-init" if option[0] in ("--weights", "--random-init") else option[0]
    assert f"{name} applies to a model given by name; {converted_dir} is a checkpoint" in result.output


@pytest.mark.parametrize("option", [["--val-split", "0.2"], ["--seed", "3"]])
def test_val_split_options_are_refused_for_data_with_its_own_val_part(option, converted_dir):
    result = CliRunner().invoke(main, ["eval", str(converted_dir), "--data", DATA, "--workers", "0", *option])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"{option[0]} applies to data without a val part of its own; {DATA} has one" in result.output


def test_a_score_from_predictions_that_are_all_one_class_gets_a_note(tmp_path):
    """Every prediction one class gives that class's share as top-1 (here 25% of 4 balanced
    classes): it looks like a result and is not one, so eval and the epoch line say so."""
    model = flexsurgeon.convert(timm.create_model("resnet18", num_classes=4), img_size=64)
    with torch.no_grad():
        model.get_classifier().bias[2] = 1e4
    folder = flexsurgeon.save(model, tmp_path / "skewed")
    result = CliRunner().invoke(main, ["eval", str(folder), "--data", DATA, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        "note: every prediction is class 2: the score is that class's share of the data; in a short run, "
        "BatchNorm statistics may not have settled")
    tally = Tally(["main"])
    tally.add([torch.eye(4)[[0, 1, 2, 2]]], [torch.zeros(())], torch.tensor([0, 1, 2, 3]))
    assert "one_class" not in tally.summary() and one_class_note(tally.summary()) == ""


def test_scoring_a_timm_data_set_loads_its_val_split_alone(converted_dir):
    """eval needs the val split only: a timm data set's train split (for a large set, a large
    download) is never asked for, and the class names come from the val split."""
    import PIL.Image

    import flexsurgeon.data.timm_sets as timm_sets

    asked = []

    class Split(torch.utils.data.Dataset):
        classes = ["a", "b", "c", "d"]

        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return self.transform(PIL.Image.new("RGB", (64, 64), (30 * i, 0, 0))), i % 4

    def create_dataset(name, *, split, transform, **kwargs):
        asked.append(split)
        if split == "validation":
            raise ValueError("no validation split")  # like a set whose held-out split is 'test'
        return Split(transform)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm_sets, "create_dataset", create_dataset)
        scores = evaluate_source(str(converted_dir), "hfds/someone/pets", workers=0, device="cpu", progress=False)
        assert asked == ["validation", "test"] and scores["count"] == 8
        assert "8 val images, 4 classes" in scores["data"] and "train" not in scores["data"]
        asked.clear()
        load_data("hfds/someone/pets", data_config={"input_size": (3, 64, 64), "interpolation": "bilinear",
                                                    "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
        assert asked == ["train", "validation", "test"]  # fine-tuning reads both
