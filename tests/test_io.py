import json
import pickle

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open

import flexsurgeon
from flexsurgeon.errors import CheckpointError, WeightsError
from flexsurgeon.surgery.sources import build_source, parse_source, read_state_dict


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = flexsurgeon.convert("resnet18", img_size=64, num_classes=7).eval()
    with torch.no_grad():  # trained-looking FlexPool weights, so a load that drops them would show
        for p in model.global_pool.parameters():
            p.normal_()
    directory = tmp_path_factory.mktemp("ckpt") / "resnet18-flex"
    flexsurgeon.save(model, directory)
    return model, directory


def test_folder_holds_timm_style_config_and_safetensors_with_the_plan(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "flexsurgeon" and config["num_classes"] == 7
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["model_args"]["plan"] == model.flexsurgeon_plan.to_dict() | {"img_size": [64, 64]} or \
        json.loads(json.dumps(model.flexsurgeon_plan.to_dict())) == config["model_args"]["plan"]
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["flexsurgeon_plan"]) == json.loads(model.flexsurgeon_plan.to_json())


def test_load_gives_the_same_outputs(saved, x64):
    model, directory = saved
    loaded = flexsurgeon.load(directory).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))
        assert [h.shape for h in flexsurgeon.forward_with_sac(loaded, x64)[1]] == [(2, 7), (2, 7)]


def test_timm_local_dir_loads_the_converted_model(saved, x64):
    model, directory = saved
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    assert type(loaded) is timm.models.ResNet
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))
    assert timm.data.resolve_data_config(model=loaded)["input_size"] == (3, 64, 64)


@pytest.mark.parametrize("kwargs, message", [
    ({"features_only": True}, "features_only is not supported"),
    ({"out_indices": (1, 2)}, "out_indices applies with features_only"),
    ({"num_classes": 3}, "has num_classes=7; convert again"),
    ({"in_chans": 1}, "has in_chans=3; convert again"),
    ({"img_size": 96}, "img_size is fixed by the conversion"),
    ({"global_pool": "max"}, "global_pool cannot change"),
    ({"no_such_argument": 1}, "does not take no_such_argument"),
])
def test_timm_keyword_arguments_are_refused_in_one_line_never_ignored(saved, kwargs, message):
    _, directory = saved
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=message):
        timm.create_model(f"local-dir:{directory}", pretrained=True, **kwargs)


def test_features_only_for_a_torchvision_source_points_at_torchvisions_feature_extractor(tmp_path):
    directory = tmp_path / "tv"
    flexsurgeon.save(flexsurgeon.convert("tv:resnet18", img_size=64, num_classes=4), directory)
    with pytest.raises(flexsurgeon.FlexSurgeonError) as info:
        timm.create_model(f"local-dir:{directory}", pretrained=True, features_only=True)
    assert "create_feature_extractor" in str(info.value) and "forward_intermediates" not in str(info.value)


def test_timm_keyword_arguments_reach_the_source_builder(saved, x64):
    model, directory = saved
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True, drop_rate=0.3, drop_path_rate=0.1,
                               num_classes=7).eval()
    assert loaded.drop_rate == 0.3
    assert any(type(m).__name__ == "DropPath" for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))  # eval mode: dropout and drop-path are off


def test_torch_save_of_the_whole_model_round_trips(saved, tmp_path, x64):
    model, _ = saved
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))
    loaded.reset_classifier(3)  # the re-heading hook points at the loaded object, not the saved one
    assert loaded(x64).shape == (2, 3) and model(x64).shape == (2, 7)


def test_a_folder_from_before_in_place_surgery_is_refused_with_what_to_do(saved, tmp_path):
    import shutil

    _, directory = saved
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    config = json.loads((old / "config.json").read_text())
    config["model_args"]["plan"]["version"] = 1
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="convert the source model again"):
        flexsurgeon.load(old)


def _as_version_2(directory) -> None:
    """Rewrite a converted folder's plan (config.json and the weights' metadata) in the form version 2
    wrote: ``pool_mode`` for ``pool``, each pool's ``method`` for ``replacement``."""
    from safetensors.torch import load_file, save_file

    def old_form(plan: dict) -> dict:
        plan = {**plan, "version": 2, "pool_mode": plan["pool"]}
        del plan["pool"]
        plan["pools"] = [{**{k: v for k, v in p.items() if k != "replacement"}, "method": p["replacement"]}
                         for p in plan["pools"]]
        return plan

    config = json.loads((directory / "config.json").read_text())
    config["model_args"]["plan"] = old_form(config["model_args"]["plan"])
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = directory / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    metadata["flexsurgeon_plan"] = json.dumps(old_form(json.loads(metadata["flexsurgeon_plan"])))
    save_file(load_file(str(weights)), str(weights), metadata=metadata)


def test_a_version_2_folder_is_refused_in_one_line_by_load_timm_and_the_cli(saved, tmp_path):
    import shutil

    from click.testing import CliRunner

    from flexsurgeon.cli.main import main

    _, directory = saved
    old = tmp_path / "v2"
    shutil.copytree(directory, old)
    _as_version_2(old)
    assert "pool_mode" in (old / "config.json").read_text()
    expected = "plan version 2 is not supported (this flexsurgeon reads 3); convert the source model again"
    for load in (lambda: flexsurgeon.load(old), lambda: timm.create_model(f"local-dir:{old}", pretrained=True)):
        with pytest.raises(flexsurgeon.FlexSurgeonError) as info:
            load()
        message = str(info.value)
        assert expected in message and "unknown field" not in message and "\n" not in message, message
    for args in (["eval", old, "--data", "synthetic:classes=7,train=8,val=8,size=64"],
                 ["export", old, "--format", "safetensors", "-o", tmp_path / "exported"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1 and expected in lines[0], result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output  # no crash
    assert not (tmp_path / "exported").exists()


def test_torchvision_model_round_trips(tmp_path, x64):
    model = flexsurgeon.convert("tv:resnet18", img_size=64, num_classes=3).eval()
    flexsurgeon.save(model, tmp_path / "tv")
    loaded = flexsurgeon.load(tmp_path / "tv").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))


def test_existing_folder_is_refused_without_force(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        flexsurgeon.save(model, target)
    assert (target / "keep.txt").read_text() == "mine"
    flexsurgeon.save(model, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_a_failing_write_leaves_no_folder(saved, tmp_path, monkeypatch):
    model, _ = saved
    import flexsurgeon.checkpoints.io as fio

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_model", broken)
    with pytest.raises((CheckpointError, OSError)):
        fio.save(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"architecture": "resnet50"}'), "not 'flexsurgeon'"),
    (lambda d: (d / "model.safetensors").unlink(), "weights file not found"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "cannot load"),
])
def test_broken_folders_are_refused_clearly(saved, tmp_path, damage, message):
    import shutil

    _, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    damage(copy)
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=message):
        flexsurgeon.load(copy)


def test_weights_file_loads_a_source_state_dict(tmp_path, x64):
    source = timm.create_model("resnet18", num_classes=4).eval()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    converted = flexsurgeon.convert("resnet18", img_size=64, num_classes=4, weights=tmp_path / "resnet18.pth").eval()
    with torch.no_grad():
        assert (converted(x64) - source(x64)).abs().max() <= 1e-5


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_pickle_with_a_payload_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"conv1.weight": _Payload()}, handle)
    with pytest.raises(WeightsError, match="weights-only"):
        read_state_dict(path)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        build_source(parse_source("resnet18"), tmp_path / "w.pth")


def test_a_gray_checkpoint_carries_one_channel_statistics_and_timms_transform_pipeline_works(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    flexsurgeon.save(flexsurgeon.convert("resnet18", img_size=64, num_classes=4, in_chans=1), tmp_path / "gray")
    model = timm.create_model(f"local-dir:{tmp_path / 'gray'}", pretrained=True).eval()
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (1, 64, 64) and len(config["mean"]) == 1 and len(config["std"]) == 1
    assert config["mean"][0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    transform = timm.data.create_transform(**config)
    image = Image.fromarray((np.arange(80 * 96) % 251).astype(np.uint8).reshape(80, 96), mode="L")
    x = transform(image)
    assert x.shape == (1, 64, 64)
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, 4)
