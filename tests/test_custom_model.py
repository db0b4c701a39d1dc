"""Your own models: any nn.Module whose pooling the analysis finds, in Python and as FILE.py:FACTORY."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import flexsurgeon
from flexsurgeon.cli.main import main

HERE = Path(__file__).resolve()
DATA = "synthetic:classes=3,train=64,val=32,size=32"


class SmallCNN(nn.Module):
    """A user's model: a pooling module, and a forward that takes an extra argument."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x, temperature: float = 1.0):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1)) / temperature


def small_cnn(num_classes: int = 4) -> nn.Module:
    """The factory the command line names as tests/test_custom_model.py:small_cnn."""
    torch.manual_seed(0)
    return SmallCNN(num_classes)


def broken_factory():
    raise ValueError("no weights here")


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_convert_save_and_load_into_a_model_the_user_built(tmp_path):
    torch.manual_seed(0)
    source = SmallCNN().eval()
    reference = copy.deepcopy(source)
    converted = flexsurgeon.convert(source, img_size=32)
    assert converted is source and type(converted) is SmallCNN
    plan = converted.flexsurgeon_plan
    assert (plan.source.library, plan.source.name) == ("custom", "SmallCNN")
    assert [(p.replacement, p.module) for p in plan.pools] == [("in_place", "pool")]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(converted(x, temperature=2.0), reference(x, temperature=2.0), atol=1e-6)
        converted.pool.weight.normal_()  # trained-looking weights, so the load must carry them
        expected = converted(x)
    folder = flexsurgeon.save(converted, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["plan"]["source"] == {"library": "custom", "name": "SmallCNN", "kwargs": {},
                                                      "weights": ""}  # the caller built it: origin unknown

    loaded = flexsurgeon.load(folder, model=SmallCNN()).eval()
    assert type(loaded) is SmallCNN
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"custom model \(SmallCNN\).*model=YOUR_MODEL"):
        flexsurgeon.load(folder)
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="custom model"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_a_model_that_does_not_match_the_folder_is_refused(tmp_path):
    converted = flexsurgeon.convert(SmallCNN(), img_size=32)
    folder = flexsurgeon.save(converted, tmp_path / "custom")
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="does not match"):
        flexsurgeon.load(folder, model=SmallCNN(num_classes=7))


def test_the_command_line_converts_and_finetunes_a_factory_and_reads_its_folders(tmp_path):
    factory = f"{HERE}:small_cnn"
    code, output = _run("inspect", factory, "--img-size", "32")
    assert code == 0 and "pool (in place)" in output, output
    code, output = _run("convert", factory, "--img-size", "32", "--num-classes", "3", "-o", tmp_path / "c")
    assert code == 0 and "custom SmallCNN" in output, output
    code, output = _run("finetune", factory, "--data", DATA, "--recipe", "smoke", "--epochs", "1",
                        "--img-size", "32", "-o", tmp_path / "run")
    assert code == 0 and "done: best val top-1" in output, output
    best = tmp_path / "run" / "best"
    code, output = _run("eval", best, "--data", DATA)
    assert code == 1 and "--model-code FILE.py:FACTORY" in output and "Traceback" not in output, output
    code, output = _run("eval", best, "--data", DATA, "--model-code", factory, "--json")
    assert code == 0 and "\"count\": 32" in output, output
    code, output = _run("finetune", tmp_path / "c", "--data", DATA, "--recipe", "smoke", "--epochs", "1",
                        "--model-code", factory, "-o", tmp_path / "run2")
    assert code == 0, output
    code, output = _run("export", best, "--format", "safetensors", "-o", tmp_path / "e", "--model-code", factory)
    assert code == 0, output


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_model_code_for_a_model_that_is_not_a_folder_is_refused(command, tmp_path):
    # --model-code rebuilds the source of a converted folder; beside a model name or a factory it
    # could not take effect, so it is refused rather than ignored
    for source in ("resnet10t", f"{HERE}:small_cnn"):
        code, output = _run(command, source, "--random-init", "--data", DATA, "--model-code", f"{HERE}:small_cnn",
                            *(["--recipe", "smoke", "-o", tmp_path / "run"] if command == "finetune" else []))
        assert code == 1 and "Traceback" not in output, output
        assert f"--model-code builds the source of a converted folder; {source} is not one" in output
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, message", [
    ("no_such_file.py:f", "model code file not found"),
    (f"{HERE}:no_such_factory", "has no function 'no_such_factory'"),
    (f"{HERE}:broken_factory", "broken_factory failed: ValueError: no weights here"),
    (f"{HERE}:_run", "returned a tuple, not a torch.nn.Module"),
])
def test_bad_model_code_is_one_line(spec, message):
    code, output = _run("inspect", spec, "--img-size", "32")
    assert code == 1 and message in output and "Traceback" not in output, output


def test_ablate_takes_a_factory(tmp_path):
    code, output = _run("ablate", f"{HERE}:small_cnn", "--variants", "avg,flex+sac", "--seeds", "1",
                        "--img-size", "32", "--data", DATA, "--recipe", "smoke", "--epochs", "1",
                        "-o", tmp_path / "ablation")
    assert code == 0 and "results in" in output, output
    assert (tmp_path / "ablation" / "runs" / "flex+sac" / "seed0" / "score.json").is_file()


class _ChangesItsStage(SmallCNN):
    """Writes into stage2's output after stage3 has read it: a head on stage2 would see the change."""

    def forward(self, x, temperature: float = 1.0):
        mid = self.stage2(self.stage1(self.stem(x)))
        out = self.stage3(mid)
        mid.zero_()
        return self.fc(self.pool(out).flatten(1))


def test_a_tap_changed_in_place_after_its_stage_is_refused():
    converted = flexsurgeon.convert(_ChangesItsStage(), img_size=32, sac_stages=["stage2"])
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="changed the tensor at SAC tap 'stage2"):
        flexsurgeon.forward_with_sac(converted, torch.randn(2, 3, 32, 32))


def test_a_timm_model_built_with_arguments_a_plan_cannot_hold_is_saved_as_the_users_own(tmp_path):
    # act_layer=nn.SiLU cannot go into JSON; rebuilt without it, resnet10t would be another network
    def build():
        torch.manual_seed(0)
        return timm.create_model("resnet10t", num_classes=3, act_layer=nn.SiLU).eval()

    converted = flexsurgeon.convert(build(), img_size=64)
    assert (converted.flexsurgeon_plan.source.library, converted.flexsurgeon_plan.source.name) == ("custom", "ResNet")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = converted(x)
    folder = flexsurgeon.save(converted, tmp_path / "gelu")
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"custom model \(ResNet\)"):
        flexsurgeon.load(folder)
    with torch.no_grad():
        assert torch.equal(flexsurgeon.load(folder, model=build()).eval()(x), expected)
