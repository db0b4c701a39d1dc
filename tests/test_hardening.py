"""Bad input and untrusted files: every wrong argument, damaged checkpoint file or hostile
document is refused with one line that names the problem, before any model is built, and
nothing flexsurgeon loads can run code. (Kills, full disks and out-of-memory: test_faults.py.)
"""
import ast
import json
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import flexsurgeon
import flexsurgeon.checkpoints.io as fio
from flexsurgeon.cli.main import main
from flexsurgeon.data import load_data
from flexsurgeon.data.loaders import make_loader
from flexsurgeon.errors import CheckpointError, DataError, FlexSurgeonError, PlanError, RecipeError
from flexsurgeon.surgery.plan import SurgeryPlan
from flexsurgeon.training.recipe import Recipe, from_dict, load_recipe, parse_override, with_overrides

MODEL = "test_resnet"  # timm's 0.4M-parameter test network
DATA = "synthetic:classes=4,train=32,val=16"
PACKAGE = Path(flexsurgeon.__file__).parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    torch.manual_seed(0)
    flexsurgeon.save(flexsurgeon.convert(MODEL, img_size=64, num_classes=4), root / "ck")
    flexsurgeon.save(flexsurgeon.convert(MODEL, img_size=64, num_classes=5), root / "other")
    return root / "ck"


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    # CliRunner catches everything: an exception other than SystemExit would be a traceback for a user
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    return result.exit_code, result.output, errors


# ---------------------------------------------------------------------------------------- the command line

CONVERT = ["convert", MODEL, "--random-init", "--img-size", "64", "-o", "{tmp}/x"]


def _with(base, *extra):
    return [*base, *extra]


@pytest.mark.parametrize("args,message", [
    (["convert", "no_such_net", "--random-init", "-o", "{tmp}/x"], "unknown model 'no_such_net'"),
    (["convert", "tv:no_such_net", "--random-init", "-o", "{tmp}/x"], "unknown torchvision model 'no_such_net'"),
    (["convert", "flexsurgeon", "--random-init", "-o", "{tmp}/x"], "not a source model"),
    (_with(CONVERT, "--img-size", "-3"), "'-3' is not a size"),
    (_with(CONVERT, "--img-size", "64x"), "'64x' is not a size"),
    (_with(CONVERT, "--num-classes", "0"), "Invalid value for '--num-classes': 0 is not in the range x>=1"),
    (_with(CONVERT, "--num-classes", "ten"), "'ten' is not a valid integer"),
    (_with(CONVERT, "--in-chans", "0"), "Invalid value for '--in-chans'"),
    (_with(CONVERT, "--dropout", "1"), "Invalid value for '--dropout'"),
    (_with(CONVERT, "--pool", "max"), "Invalid value for '--pool': 'max' is not one of"),
    (_with(CONVERT, "--sac-weights", "0.3,0.2,0.5"), "must increase with depth"),
    (_with(CONVERT, "--sac-weights", "0.1,0.9"), "needs 3 values"),
    (_with(CONVERT, "--sac-weights", "a,b"), "'a,b' is not a comma-separated list of numbers"),
    (_with(CONVERT, "--sac-stages", "99"), "--sac-stages index 99 is out of range"),
    (_with(CONVERT, "--bogus"), "No such option '--bogus'"),
])
def test_every_wrong_convert_argument_is_one_error_line_and_writes_nothing(tmp_path, args, message):
    code, output, errors = _cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert code != 0 and len(errors) == 1, output
    assert message in errors[0], output
    assert "Traceback" not in output and not (tmp_path / "x").exists()


FINETUNE = ["finetune", "{ck}", "--data", DATA, "--recipe", "smoke", "-o", "{tmp}/run"]


@pytest.mark.parametrize("args,message", [
    (_with(FINETUNE, "--epochs", "-1"), "Invalid value for '--epochs': -1 is not in the range x>=1"),
    (_with(FINETUNE, "--epochs", "0"), "0 is not in the range x>=1"),
    (_with(FINETUNE, "--epochs", "three"), "'three' is not a valid integer"),
    (_with(FINETUNE, "--batch-size", "0"), "Invalid value for '--batch-size'"),
    (_with(FINETUNE, "--img-size", "4"), "recipe field 'img_size' = 4 must be at least 8"),
    (_with(FINETUNE, "--img-size", "48by64"), "Invalid value for '--img-size': '48by64' is not a size"),
    (_with(FINETUNE, "--val-split", "1.5"), "Invalid value for '--val-split'"),
    (_with(FINETUNE, "--device", "tpu"), "'tpu' is not one of"),
    (_with(FINETUNE, "--lr", "-0.1"), "Invalid value for '--lr'"),
    (_with(FINETUNE, "--set", "epochs=-2"), "recipe field 'epochs' = -2 must be at least 1"),
    (_with(FINETUNE, "--set", "epochs=three"), "recipe field 'epochs' must be an integer, got 'three'"),
    (_with(FINETUNE, "--set", "lr=abc"), "recipe field 'lr' must be a finite number, got 'abc'"),
    (_with(FINETUNE, "--set", "lr=.inf"), "recipe field 'lr' must be a finite number, got inf"),
    (_with(FINETUNE, "--set", "ema=maybe"), "recipe field 'ema' must be true or false, got 'maybe'"),
    (_with(FINETUNE, "--set", "seed=2024-13-01"), "recipe field 'seed' must be an integer, got '2024-13-01'"),
    (_with(FINETUNE, "--set", "epochz=3"), "unknown recipe field 'epochz' (did you mean 'epochs'?)"),
    (_with(FINETUNE, "--set", "lr"), "override 'lr' must look like key=value"),
    (_with(FINETUNE, "--set", "sac_weights=[0.7,0.2,0.1]"), "must increase with depth"),
    (_with(FINETUNE, "--sac-weights", "0.3,0.2,0.5"), "must increase with depth"),
    (_with(FINETUNE, "--set", "sac_weights=[0.2,0.8]"),  # the folder's heads and weights are decided at convert
     "--sac-weights is chosen at convert"),
    (_with(FINETUNE, "--recipe", "{tmp}/unknown-key.yaml"), "unknown recipe field 'epochz'"),
    (_with(FINETUNE, "--recipe", "{tmp}/bad-date.yaml"), "is not valid YAML"),
    (_with(FINETUNE, "--recipe", "{tmp}/binary.yaml"), "is not valid YAML"),
    (_with(FINETUNE, "--data", "synthetic:classes=1"), "synthetic classes=1"),
    (["finetune", "no_such_net", "--random-init", "--data", DATA, "--recipe", "smoke", "-o", "{tmp}/run"],
     "unknown model 'no_such_net'"),
    (["finetune", "{tmp}", "--data", DATA, "--recipe", "smoke", "-o", "{tmp}/run"], "has no config.json"),
])
def test_every_wrong_finetune_argument_is_one_error_line_and_writes_nothing(checkpoint, tmp_path, args, message):
    (tmp_path / "unknown-key.yaml").write_text("epochz: 3\n")
    (tmp_path / "bad-date.yaml").write_text("epochs: 2024-13-01\n")  # PyYAML raises ValueError, not YAMLError
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    code, output, errors = _cli(*(a.replace("{ck}", str(checkpoint)).replace("{tmp}", str(tmp_path)) for a in args))
    assert code != 0 and len(errors) == 1, output
    assert message in errors[0], output
    assert "Traceback" not in output and not (tmp_path / "run" / "last").exists()


def test_debug_shows_the_traceback_instead():
    result = CliRunner().invoke(main, ["--debug", "convert", "no_such_net", "--random-init", "-o", "x"])
    assert result.exit_code == 1
    assert isinstance(result.exception, FlexSurgeonError) and "unknown model 'no_such_net'" in str(result.exception)


# ---------------------------------------------------------------------------------------- checkpoint files

def _edit_config(change):
    def damage(directory):
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
    return damage


def _edit_plan(change):
    return _edit_config(lambda config: change(config["model_args"]["plan"]))


def _write(name, data: bytes):
    return lambda directory: (directory / name).write_bytes(data)


def _weights(transform):
    def damage(directory):
        path = directory / "model.safetensors"
        path.write_bytes(transform(path.read_bytes()))
    return damage


def _set_source(**fields):
    return _edit_plan(lambda plan: plan["source"].update(fields))


def _other_weights(directory):
    shutil.copy(directory.parent / "other" / "model.safetensors", directory / "model.safetensors")


FILE_DAMAGE = {  # name -> (damage, words the message holds); all refused before a model is built
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "weights file not found"),
    "weights empty": (_write("model.safetensors", b""), "empty, truncated or not safetensors"),
    "weights truncated": (_weights(lambda b: b[: len(b) // 2]), "file not fully covered"),
    "weights header truncated": (_weights(lambda b: b[:12]), "empty, truncated or not safetensors"),
    "weights header corrupted": (_weights(lambda b: b[:8] + b"\xff" * 40 + b[48:]), "cannot load"),
    "weights header length absurd": (_weights(lambda b: (1 << 60).to_bytes(8, "little") + b[8:]), "header too large"),
    "weights from another checkpoint": (_other_weights,
                                        "was written for another plan than the one in config.json (they differ in"),
    "weights a folder": (lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()),
                         "weights file not found"),
    "config missing": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "config empty": (_write("config.json", b""), "is not valid JSON"),
    "config not JSON": (_write("config.json", b"{not json"), "is not valid JSON"),
    "config binary": (_write("config.json", b"\xff\xfe\x00\x01"), "is not valid JSON"),
    "config a list": (_write("config.json", b"[1, 2]"), "must hold a JSON object"),
    "config unknown architecture": (_edit_config(lambda c: c.update(architecture="resnet50")),
                                    "names architecture 'resnet50'"),
    "config extra field": (_edit_config(lambda c: c.update(evil=1)), "unknown field(s) evil"),
    "config extra model_args": (_edit_config(lambda c: c["model_args"].update(checkpoint_path="/etc/passwd")),
                                "model_args field(s) checkpoint_path disagree with the plan"),
    "config no plan": (_edit_config(lambda c: c.pop("model_args")), "has no model_args.plan"),
    "config pretrained_cfg not an object": (_edit_config(lambda c: c.update(pretrained_cfg=[1])),
                                            "pretrained_cfg must be a JSON object"),
    "config num_classes disagrees": (_edit_config(lambda c: c.update(num_classes=9)),
                                     "says num_classes 9 but its plan has 4"),
    "plan field missing": (_edit_plan(lambda p: p.pop("pools")), "plan is missing field(s): pools"),
    "plan field extra": (_edit_plan(lambda p: p.update(evil="x")), "plan has unknown field(s): evil"),
    "plan wrong type": (_edit_plan(lambda p: p.update(num_classes="4")), "num_classes must be a positive integer"),
    "plan version": (_edit_plan(lambda p: p.update(version=4)), "plan version 4 is not supported"),
    "plan custom source": (_set_source(library="custom", name="MyNet"), "custom model (MyNet)"),
    "plan in-place module path": (_edit_plan(lambda p: p["pools"][0].update(module="__import__('os')")),
                                  "is not a module path"),
    "plan lambdas not increasing": (_edit_plan(lambda p: p.update(sac_weights=[0.2, 0.1, 0.7])),
                                    "must increase with depth"),
    "plan shapes do not match the weights": (_edit_plan(lambda p: p["pools"][0].update(size=[4, 4])),
                                             "they differ in pools"),
    "plan unknown model": (_set_source(name="resnet_nonexistent"), "unknown timm model 'resnet_nonexistent'"),
    "plan module path": (_set_source(name="timm.models.resnet.resnet50"),
                         "unknown timm model 'timm.models.resnet.resnet50' (plans name registered models only"),
    "plan callable": (_set_source(name="os.system"), "unknown timm model 'os.system'"),
    "plan expression": (_set_source(name="__import__('os').system"), "is not a model name"),
    "plan torchvision module path": (_set_source(library="torchvision", name="torchvision.models.resnet18"),
                                     "unknown torchvision model 'torchvision.models.resnet18'"),
    "plan other library": (_set_source(library="builtins", name="exec"), "source.library 'builtins' is not one of"),
    "plan reads a file": (_set_source(kwargs={"checkpoint_path": "/tmp/evil.pth"}),
                          "may not set checkpoint_path"),
    "plan downloads": (_set_source(kwargs={"pretrained_cfg_overlay": "x", "pretrained": True}),
                       "may not set pretrained, pretrained_cfg_overlay"),
    "plan names flexsurgeon itself": (_set_source(name="flexsurgeon"), "not a source model"),
}


@pytest.mark.parametrize("case", list(FILE_DAMAGE))
def test_damaged_checkpoint_files_are_refused_before_any_model_is_built(checkpoint, tmp_path, monkeypatch, case):
    damage, words = FILE_DAMAGE[case]
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    shutil.copytree(checkpoint.parent / "other", tmp_path / "other")
    damage(copy)

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built from a refused folder")

    monkeypatch.setattr(fio, "build_from_plan", no_build)
    with pytest.raises(FlexSurgeonError) as info:
        flexsurgeon.load(copy)
    message = str(info.value)
    assert words in message and str(copy) in message and "\n" not in message, message


# what timm itself reads before it reaches our architecture (a config it cannot parse or that names
# another architecture, a config with no plan for the entrypoint) is timm's to refuse
TIMM_READS_FIRST = ("config missing", "config empty", "config not JSON", "config binary", "config a list",
                    "config unknown architecture", "config no plan", "config pretrained_cfg not an object")


@pytest.mark.parametrize("case", [c for c in FILE_DAMAGE if c not in TIMM_READS_FIRST])
def test_timm_local_dir_refuses_what_flexsurgeon_load_refuses_naming_the_file(checkpoint, tmp_path, monkeypatch,
                                                                               case):
    damage, words = FILE_DAMAGE[case]
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    shutil.copytree(checkpoint.parent / "other", tmp_path / "other")
    damage(copy)
    with pytest.raises(FlexSurgeonError) as info:
        timm.create_model(f"local-dir:{copy}", pretrained=True)
    message = str(info.value)
    assert words in message and str(copy) in message and "\n" not in message, message


def test_weights_with_the_wrong_shapes_are_refused_naming_the_tensor(checkpoint, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    other = load_file(str(checkpoint.parent / "other" / "model.safetensors"))  # 5 classes, no plan metadata
    save_file(other, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not match the model its plan builds: fc.bias has shape \[5\] "
                                              r"in the file but \[4\] in the model"):
        flexsurgeon.load(copy)


def test_timm_local_dir_refuses_mismatched_files_too(checkpoint, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    shutil.copytree(checkpoint.parent / "other", tmp_path / "other")
    _other_weights(copy)
    with pytest.raises(CheckpointError, match="do not belong together"):
        timm.create_model(f"local-dir:{copy}", pretrained=True)


def test_a_damaged_folder_given_to_finetune_is_one_error_line(checkpoint, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    _weights(lambda b: b[: len(b) // 2])(copy)
    code, output, errors = _cli("finetune", copy, "--data", DATA, "--recipe", "smoke", "-o", tmp_path / "run")
    assert code == 1 and len(errors) == 1 and "file not fully covered" in errors[0], output


# ---------------------------------------------------------------------------------------- untrusted files

class _Payload:
    """Unpickling this object runs code: it creates the file PWNED in the working folder."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name,write", [
    ("evil.pth", lambda path: torch.save({"conv1.weight": _Payload()}, path)),  # torch's zip format
    ("evil.bin", lambda path: path.write_bytes(pickle.dumps({"conv1.weight": _Payload()}))),  # a bare pickle
    ("evil.safetensors", lambda path: path.write_bytes(pickle.dumps(_Payload()))),
])
def test_weights_files_carrying_a_payload_are_refused_and_it_never_runs(tmp_path, monkeypatch, name, write):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()
    code, output, errors = _cli("convert", MODEL, "--weights", tmp_path / name, "--img-size", "64", "-o", "out")
    assert code == 1 and len(errors) == 1, output
    assert f"cannot read weights from {tmp_path / name}" in errors[0]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_whose_weights_are_a_pickle_is_refused_and_it_never_runs(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    torch.save({"conv1.0.weight": _Payload()}, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="not safetensors"):
        flexsurgeon.load(copy)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("library,name", [("timm", "evil_plan_module.build"), ("timm", "evil_plan_module"),
                                          ("torchvision", "evil_plan_module")])
def test_a_plan_naming_an_importable_module_is_refused_without_importing_it(checkpoint, tmp_path, monkeypatch,
                                                                             library, name):
    (tmp_path / "evil_plan_module.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('imported')\nbuild = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    _set_source(library=library, name=name)(copy)
    with pytest.raises(FlexSurgeonError, match=f"unknown {library} model '{name}'"):
        flexsurgeon.load(copy)
    with pytest.raises(FlexSurgeonError, match=f"unknown {library} model '{name}'"):
        timm.create_model(f"local-dir:{copy}", pretrained=True)
    assert not (tmp_path / "PWNED").exists() and "evil_plan_module" not in sys.modules


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_library_code_never_unpickles_evaluates_or_imports_a_name_from_data():
    """A guard for new code: no eval/exec/pickle/unsafe YAML, every torch.load is weights-only, and
    modules are imported by literal names only (the package's own lazy-attribute table aside)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node, func in _calls(tree):
            where = f"{path.relative_to(PACKAGE)}:{node.lineno} {func}"
            keywords = {k.arg: k.value for k in node.keywords}
            if func in ("eval", "exec", "compile", "__import__") or func.startswith(("pickle.", "marshal.", "dill.")):
                problems.append(where)
            elif func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                problems.append(where)
            elif func == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                               and keywords["weights_only"].value is True):
                problems.append(f"{where} without weights_only=True")
            elif func in ("importlib.import_module", "import_module") and not isinstance(node.args[0], ast.Constant):
                if not (path.name == "__init__.py" and ast.unparse(node.args[0]) == "_LAZY[name]"):
                    problems.append(where)
    assert problems == []


# ---------------------------------------------------------------------------------------- data

def _garbage_image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for name in ("cat", "dog", "cow", "pig"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "x.png").write_bytes(b"not a png")
    return root


def _truncated_image_folder(root: Path) -> Path:
    """Images whose headers open (so the scan keeps them) but whose data ends early."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(buffer, "JPEG")
    data = buffer.getvalue()
    for split in ("train", "val"):
        for name in ("cat", "dog", "cow", "pig"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "x.jpg").write_bytes(data[:len(data) // 2])
    return root


def test_an_error_inside_a_dataloader_worker_stays_one_line(tmp_path):
    bundle = load_data(str(_truncated_image_folder(tmp_path / "data")), data_config={"input_size": (3, 32, 32)})
    with pytest.raises(DataError) as info:
        list(make_loader(bundle.train, batch_size=2, train=True, seed=0, num_workers=1))
    assert str(info.value) == f"no readable images under {tmp_path / 'data'}: all 4 failed to load"
    assert "Traceback" in info.value.worker_traceback  # kept for --debug


@pytest.mark.parametrize("make", [_garbage_image_folder, _truncated_image_folder], ids=["unreadable", "undecodable"])
def test_a_folder_of_bad_images_is_one_error_line_through_the_cli(checkpoint, tmp_path, make):
    """Files that are no images are left out when the folder is read; images that open but fail to
    decode are left out of their batches: either way nothing is left, and that is one line."""
    data = make(tmp_path / "data")
    code, output, errors = _cli("finetune", checkpoint, "--data", data, "--recipe", "smoke", "--workers", "1",
                                "--batch-size", "2", "-o", tmp_path / "run")
    assert code == 1 and len(errors) == 1, output
    assert "no readable images under" in errors[0] and "Traceback" not in output
    assert not (tmp_path / "run" / "best").exists()


@pytest.mark.parametrize("how", ["recipe file", "--set"])
def test_an_optimizer_typo_is_one_line_naming_the_field_before_any_run_folder(tmp_path, how):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\noptimizer: adamm\n" if how == "recipe file" else "epochs: 1\n")
    extra = ["--set", "optimizer=adamm"] if how == "--set" else []
    code, output, errors = _cli("finetune", MODEL, "--random-init", "--data", DATA, "--recipe", recipe, *extra,
                                "-o", tmp_path / "run")
    assert code != 0 and len(errors) == 1 and len(output.strip().splitlines()) == 1, output
    assert "recipe field 'optimizer' = 'adamm'" in errors[0] and "did you mean 'adam'?" in errors[0], output
    assert "sgd" in errors[0] and "adamw" in errors[0]  # the choices
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- property-based

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@st.composite
def _edited(draw, document: dict, values=JSON):
    """``document`` with a few fields replaced by arbitrary JSON, removed or added (few, so that
    many documents stay valid but for one odd value)."""
    edited = {}
    for key, value in document.items():
        change = draw(st.integers(0, 11))
        if change == 0:
            continue
        if change == 1:
            edited[key] = draw(values)
        elif change == 2 and isinstance(value, dict):
            edited[key] = draw(_edited(value))
        elif change == 2 and isinstance(value, list) and value and isinstance(value[0], dict):
            edited[key] = [draw(_edited(v)) for v in value]
        else:
            edited[key] = value
    if draw(st.integers(0, 7)) == 0:
        edited.update(draw(st.dictionaries(st.text(max_size=8), values, min_size=1, max_size=2)))
    return edited


def _valid_plan() -> dict:
    return {
        "source": {"library": "timm", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "num_classes": 10, "in_chans": 3, "img_size": [64, 64],
        "pools": [{"node": "global_pool_pool", "input": "layer4_1_act2", "channels": 512, "size": [2, 2],
                   "keepdim": False, "layout": "nchw", "module": "global_pool", "replacement": "in_place"}],
        "sac": [{"node": "layer2_1_act2", "channels": 128, "size": [8, 8], "module": "layer2.1.act2",
                 "read": "output"},
                {"node": "layer3_1_act2", "channels": 256, "size": [4, 4], "module": "layer4", "read": "input"}],
        "sac_weights": [0.1, 0.2, 0.7], "pool": "softmax", "dropout": 0.0, "version": 3,
    }


FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(_edited(_valid_plan()), JSON))
def test_random_plan_documents_give_a_plan_or_a_plan_error(document):
    try:
        plan = SurgeryPlan.from_dict(document)
    except PlanError:
        return
    assert SurgeryPlan.from_json(plan.to_json()) == plan  # what is accepted survives a save unchanged


@FUZZ
@given(st.text(max_size=200))
def test_random_plan_text_gives_a_plan_or_a_plan_error(text):
    try:
        SurgeryPlan.from_json(text)
    except PlanError:
        pass


RECIPE_KEYS = st.sampled_from(sorted(Recipe().to_dict())) | st.text(max_size=8) | st.integers() | st.none()
YAML_VALUES = st.recursive(SCALARS | st.dates() | st.integers(min_value=10 ** 300, max_value=10 ** 310),
                           lambda inner: st.lists(inner, max_size=4), max_leaves=6)


@FUZZ
@given(st.dictionaries(RECIPE_KEYS, YAML_VALUES, max_size=6))
def test_random_recipe_documents_give_a_recipe_or_a_recipe_error(document):
    try:
        recipe = from_dict(document)
    except RecipeError:
        return
    assert from_dict(recipe.to_dict()) == recipe


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


@FUZZ
@given(st.one_of(st.text(max_size=200),
                 st.lists(st.tuples(st.sampled_from(sorted(Recipe().to_dict())), st.text(max_size=20)), max_size=5)
                 .map(lambda pairs: "".join(f"{k}: {v}\n" for k, v in pairs))))
def test_random_recipe_files_and_overrides_give_a_recipe_or_a_recipe_error(recipe_dir, text):
    path = recipe_dir / "fuzz.yaml"
    path.write_text(text)
    for attempt in (lambda: load_recipe(str(path)),
                    lambda: with_overrides(Recipe(), dict([parse_override(text)]))):
        try:
            assert isinstance(attempt(), Recipe)
        except RecipeError:
            pass


@pytest.fixture(scope="module")
def config_document(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_config_files_load_or_give_the_tools_error(checkpoint, config_document, data):
    document = data.draw(st.one_of(_edited(config_document), JSON))
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "ck"
        shutil.copytree(checkpoint, copy)
        (copy / "config.json").write_text(json.dumps(document))
        try:
            flexsurgeon.load(copy)
        except FlexSurgeonError:
            pass


def test_recipe_fuzz_text_examples_that_once_crashed(tmp_path):
    """Found by the properties above: PyYAML's ValueError on impossible dates, mixed key types, huge ints."""
    for text in ("epochs: 2024-13-01\n", "1: 2\nnull: 3\nab: 4\n", f"lr: {10 ** 400}\n", "[" * 2000):
        path = tmp_path / "crash.yaml"
        path.write_text(text)
        with pytest.raises(RecipeError):
            load_recipe(str(path))
    with pytest.raises(RecipeError, match="must be an integer, got '2024-13-01'"):
        with_overrides(Recipe(), dict([parse_override("seed=2024-13-01")]))
