"""The suite stays on the CPU on a machine with a GPU; the tests about CUDA run on their own."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flexsurgeon
from flexsurgeon.training.recipe import load_recipe

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow  # several seconds on 2 CPU cores: run with -m slow
def test_on_a_machine_that_has_cuda_the_test_recipes_stay_on_the_cpu(tmp_path):
    # An inner pytest session where torch says CUDA is there and CUDA_VISIBLE_DEVICES is unset.
    (tmp_path / "fake_cuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        import os, subprocess, sys
        import torch
        from flexsurgeon.training.recipe import load_recipe
        from flexsurgeon.training.setup import resolve_device

        def test_inner():
            assert not torch.cuda.is_available()
            for name in ("smoke", "quick", "paper", "probe"):
                assert resolve_device(load_recipe(name).device).type == "cpu"
            child = "import torch; print(torch.cuda.device_count())"
            assert subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                                  check=True).stdout.strip() == "0"
    """))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fake_cuda",
                             "-p", "conftest", "--rootdir", str(tmp_path), "-c", os.devnull,
                             str(tmp_path / "test_inner.py")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout


def test_the_outer_session_hides_cuda_from_itself_and_its_children():
    assert not torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.cuda
def test_a_converted_model_fine_tunes_on_cuda_and_loads_back_on_the_cpu(tmp_path):
    from flexsurgeon.training.run import run

    torch.manual_seed(0)
    flexsurgeon.save(flexsurgeon.convert("resnet18", img_size=64, num_classes=4), tmp_path / "converted")
    result = run(str(tmp_path / "converted"), "synthetic:classes=4,train=128,val=64",
                 load_recipe("smoke").replace(device="cuda", epochs=2), tmp_path / "run", progress=False,
                 log=lambda *a: None)
    assert result is not None
    model = flexsurgeon.load(tmp_path / "run" / "best")
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()
