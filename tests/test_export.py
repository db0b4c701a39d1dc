import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.commands.export import (
    MIN_TORCH,
    export_inference_folder,
    export_onnx,
    frozen_for_export,
    write_atomic_file,
)
from flexsurgeon.errors import CheckpointError, ExportError

TOLERANCE = 1e-4  # ONNX Runtime against PyTorch, float32
POOL_WEIGHTS = ("global_pool.", "classifier.3.")  # the frozen FlexPool's weights, where the old pool was
# Older torch gets a one-line "needs torch>=2.6" instead (test_onnx_export_on_old_torch_is_one_line).
needs_onnx_exporter = pytest.mark.skipif(torch.__version__ < MIN_TORCH,
                                         reason=f"ONNX export needs torch>={MIN_TORCH}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """resnet10t at 64 (a 2x2 map at the pool) with two SAC heads and trained-looking FlexPool
    weights, so a graph that used average pooling or the wrong size's weights would show."""
    torch.manual_seed(0)
    model = flexsurgeon.convert("resnet10t", img_size=64, num_classes=5, weights="random").eval()
    with torch.no_grad():
        for p in [*model.global_pool.parameters(), *model.sac_heads.parameters()]:
            p.normal_()
    assert len(model.flexsurgeon_plan.sac) == 2
    folder = tmp_path_factory.mktemp("src") / "resnet10t-flex"
    flexsurgeon.save(model, folder)
    return model, folder


def _x(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * size))


def _expected(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _onnx_run(path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _onnx_graph(path):
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(str(path)).graph


@pytest.mark.parametrize("pool", ["softmax", "linear"])
def test_frozen_pools_give_the_models_outputs_at_native_and_other_sizes(converted, pool):
    model = converted[0]
    if pool == "linear":  # weights that do not sum to one, so the rescaling on resampling shows
        torch.manual_seed(0)
        model = flexsurgeon.convert("resnet10t", img_size=64, num_classes=5, pool=pool, weights="random")
        with torch.no_grad():
            for p in model.global_pool.parameters():
                p.normal_(0.3, 0.1)
    model.train()
    for size in (64, 96):
        x = _x(2, size)
        frozen = frozen_for_export(model, x)
        with torch.no_grad():
            got = frozen(x)
        assert model.training and all(m.training for m in model.modules())  # the mode is left alone
        assert not len(frozen.sac_heads) and len(model.sac_heads) == 2  # the model keeps its heads
        assert type(model.global_pool).__name__ == "FlexPool"  # and its FlexPool
        fixed = frozen.global_pool
        assert fixed.weights.shape == (512, size // 32, size // 32)
        assert torch.allclose(got, _expected(model, x), atol=1e-6)
        model.train()
    model.eval()


@needs_onnx_exporter
def test_onnx_gives_pytorchs_outputs_without_sac_heads(converted, tmp_path):
    model, _ = converted
    path = tmp_path / "m.onnx"
    path.write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_onnx(model, path)
    assert path.read_text() == "mine"
    assert export_onnx(model.train(), path, force=True) == path
    assert model.training  # export leaves the model's mode alone
    graph = _onnx_graph(path)
    names = [i.name for i in graph.initializer]
    assert not [n for n in names if "sac_heads" in n]
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Softmax", "Resize"}  # FlexPool weights are a constant, not recomputed
    (weights,) = [i for i in graph.initializer if i.name.startswith(POOL_WEIGHTS)]
    assert list(weights.dims) == [512, 2, 2]  # 2x2 map at 64
    for batch in (1, 3):  # the batch dimension is dynamic
        x = _x(batch, 64)
        assert (_onnx_run(path, x) - _expected(model, x)).abs().max().item() <= TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary leftovers


@needs_onnx_exporter
def test_onnx_at_another_size_carries_weights_for_that_size(converted, tmp_path):
    model, _ = converted
    path = export_onnx(model, tmp_path / "m96.onnx", img_size=96)
    (weights,) = [i for i in _onnx_graph(path).initializer if i.name.startswith(POOL_WEIGHTS)]
    assert list(weights.dims) == [512, 3, 3]  # 3x3 map at 96: resampled from the 2x2 weights
    x = _x(2, 96)
    assert (_onnx_run(path, x) - _expected(model, x)).abs().max().item() <= TOLERANCE


@needs_onnx_exporter
def test_torchvision_model_exports(tmp_path):
    """SqueezeNet pools after its classifier conv, keeping dims (FlexPool keepdim=True); a 3x3
    map at 64, 3x5 at the exported 64x96."""
    torch.manual_seed(0)
    model = flexsurgeon.convert("tv:squeezenet1_0", img_size=64, num_classes=3, weights="random").eval()
    with torch.no_grad():
        for p in model.classifier[3].parameters():
            p.normal_()
    path = export_onnx(model, tmp_path / "tv.onnx", img_size=(64, 96))
    (weights,) = [i for i in _onnx_graph(path).initializer if i.name.startswith(POOL_WEIGHTS)]
    assert list(weights.dims) == [3, 3, 5]
    x = torch.randn(2, 3, 64, 96)
    assert (_onnx_run(path, x) - _expected(model, x)).abs().max().item() <= TOLERANCE


def test_writes_land_with_their_side_files_or_not_at_all(tmp_path):
    def write(destination):  # what ONNXProgram.save does for a model over 2 GB
        destination.write_bytes(b"model")
        destination.with_name(destination.name + ".data").write_bytes(b"weights")

    assert write_atomic_file(tmp_path / "big.onnx", write, force=False) == tmp_path / "big.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]

    def broken(destination):
        destination.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ExportError, match="could not write .*new.onnx: No space left on device"):
        write_atomic_file(tmp_path / "new.onnx", broken, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


@needs_onnx_exporter
def test_missing_onnx_packages_are_one_line_naming_the_extra(converted, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError) as info:
        export_onnx(converted[0], tmp_path / "m.onnx")
    assert str(info.value) == "ONNX export needs the onnxscript package: pip install 'flexsurgeon[export]'"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("img_size", [0, (64,), (64, 64.0), True])
def test_bad_sizes_are_refused(converted, tmp_path, img_size):
    with pytest.raises(ExportError, match="img_size must be a positive integer or a pair"):
        export_onnx(converted[0], tmp_path / "m.onnx", img_size=img_size)
    assert not list(tmp_path.iterdir())


def test_inference_folder_has_no_sac_heads_and_loads_both_ways(converted, tmp_path):
    model, _ = converted
    out = export_inference_folder(model, tmp_path / "inf")
    assert len(model.sac_heads) == 2  # the model keeps its heads
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith("sac_heads.")]
    assert json.loads((out / "config.json").read_text())["model_args"]["plan"]["sac"] == []
    x = _x(2, 64)
    for loaded in (flexsurgeon.load(out), timm.create_model(f"local-dir:{out}", pretrained=True)):
        assert not len(loaded.sac_heads)
        assert torch.equal(_expected(loaded, x), _expected(model, x))
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        export_inference_folder(model, out)


def test_only_converted_models_export(tmp_path):
    with pytest.raises(ExportError, match="only models returned by flexsurgeon.convert"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@needs_onnx_exporter
def test_cli_exports_onnx_and_refuses_to_overwrite(converted, tmp_path):
    model, folder = converted
    out = tmp_path / "m.onnx"
    code, output = _cli("export", folder, "--format", "onnx", "-o", out, "--img-size", "96")
    assert code == 0, output
    assert "SAC heads dropped" in output and "3x96x96" in output
    x = _x(2, 96)
    assert (_onnx_run(out, x) - _expected(model, x)).abs().max().item() <= TOLERANCE
    code, output = _cli("export", folder, "--format", "onnx", "-o", out)
    assert code == 1 and "already exists; pass --force" in output and "Traceback" not in output


def test_cli_exports_an_inference_folder(converted, tmp_path):
    model, folder = converted
    out = tmp_path / "inf"
    code, output = _cli("export", folder, "--format", "safetensors", "-o", out)
    assert code == 0, output
    x = _x(2, 64)
    assert torch.equal(_expected(flexsurgeon.load(out), x), _expected(model, x))
    code, output = _cli("export", folder, "--format", "safetensors", "-o", out, "--force")
    assert code == 0, output


@pytest.mark.parametrize("args,message", [
    (["{src}", "--format", "tflite", "-o", "{tmp}/x"], "'tflite' is not one of"),
    (["{tmp}/missing", "--format", "onnx", "-o", "{tmp}/x"], "holds no checkpoint"),
    (["{src}", "--format", "safetensors", "--img-size", "96", "-o", "{tmp}/x"], "apply to --format onnx only"),
    (["{src}", "--format", "onnx", "--img-size", "abc", "-o", "{tmp}/x"], "is not a size"),
    (["{src}", "-o", "{tmp}/x"], "Missing option '--format'"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(converted, tmp_path, args, message):
    args = [a.replace("{src}", str(converted[1])).replace("{tmp}", str(tmp_path)) for a in args]
    code, output = _cli("export", *args)
    assert code != 0
    assert message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "x").exists()


def test_onnx_export_on_old_torch_is_one_line(monkeypatch, tmp_path):
    import flexsurgeon.commands.export as export

    monkeypatch.setattr(export.torch, "__version__", torch.torch_version.TorchVersion("2.3.1"))
    model = flexsurgeon.convert("resnet18", img_size=64, num_classes=4).eval()
    with pytest.raises(ExportError, match=r"^ONNX export needs torch>=2.6 \(installed: 2.3.1\): pip install -U torch$"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
