"""The zoo walk's command-line check (benchmarks/zoo_cli.py ``check_cli``): what it counts as
preserved, refused or failed through ``python -m flexsurgeon convert`` / ``inspect``.

The canned-output tests replace the subprocess and run in milliseconds; one test runs the real
commands on timm's tiny ``test_resnet`` (marked ``zoo``: two CLI processes)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo_coverage", ROOT / "benchmarks" / "zoo_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for the zoo_* modules beside it
    return module


@pytest.fixture(scope="module")
def zoo_cli(zoo):
    return importlib.import_module("zoo_cli")


def _record(outcome, model="test_resnet", img="64x64"):
    return {"model": model, "source": "timm", "family": "resnet", "outcome": outcome, "reason": "", "img": img,
            "pool": None, "params_m": 0.4}


def _fake(monkeypatch, zoo_cli, convert, inspect=(0, "", ""), folder=True, loads=(True, True, "")):
    """``convert``: (rc, stdout, stderr) with {out} for the output folder; ``folder``: whether
    convert leaves one."""
    def run(argv, env, cwd, timeout):
        assert env["HF_HUB_OFFLINE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["https_proxy"] == zoo_cli._NO_NETWORK
        if argv[0] == "inspect":
            return inspect
        out = Path(argv[argv.index("-o") + 1])
        if folder:
            out.mkdir()
        rc, stdout, stderr = convert
        return rc, stdout.format(out=out), stderr

    monkeypatch.setattr(zoo_cli, "_run_cli", run)
    monkeypatch.setattr(zoo_cli, "_load_checks", lambda folder, size, timeout: loads)


GOOD = ("converted test_resnet: FlexPool[softmax] at global_pool (in place); SAC heads: a, b\n"
        "  model                                 parameters  multiply-adds  change vs source\n"
        "  source                                373,173     16,392,672\n"
        "saved {out}/  (load: ...)\n")
ARGS = SimpleNamespace(timeout=30)


def test_cli_preserved(monkeypatch, zoo_cli):
    _fake(monkeypatch, zoo_cli, (0, GOOD, ""))
    cli = zoo_cli.check_cli(_record("preserved"), ARGS)
    assert cli["result"] == "preserved", cli
    assert cli["converted_line"] and cli["costs_table"] and cli["saved_line"] and cli["loads"]


def test_cli_failures_are_named(monkeypatch, zoo_cli):
    # the user report: the folder is written, then the command fails with a traceback
    traceback = ("Traceback (most recent call last):\n  ...\n"
                 "RuntimeError: Expected more than 1 value per channel when training\n")
    _fake(monkeypatch, zoo_cli, (1, GOOD.split("saved")[0], traceback), inspect=(1, "", ""))
    cli = zoo_cli.check_cli(_record("preserved"), ARGS)
    assert cli["result"] == "failed"
    assert "traceback" in cli["reason"] and "Expected more than 1 value" in cli["reason"]
    assert "refuses where the API walk preserved" in cli["reason"] and "left the output folder" in cli["reason"]
    assert "\n" not in cli["reason"]

    # exit 0 but the costs were not measured, and timm's loader fails
    costs_failed = GOOD.replace(GOOD.splitlines()[1] + "\n" + GOOD.splitlines()[2],
                                "warning: costs not measured: boom")
    _fake(monkeypatch, zoo_cli, (0, costs_failed, ""), loads=(True, False, "timm local-dir fails: X"))
    cli = zoo_cli.check_cli(_record("preserved"), ARGS)
    assert cli["result"] == "failed" and "the costs table" in cli["reason"] and "timm local-dir" in cli["reason"]

    # inspect disagrees with convert
    _fake(monkeypatch, zoo_cli, (0, GOOD, ""), inspect=(1, "", "Error: x\n"))
    assert "inspect exits 1 where convert exits 0" in zoo_cli.check_cli(_record("preserved"), ARGS)["reason"]


def test_cli_refusal(monkeypatch, zoo_cli):
    _fake(monkeypatch, zoo_cli, (1, "", "Error: the head pools with attention\n"), inspect=(1, "", ""), folder=False)
    cli = zoo_cli.check_cli(_record("refused"), ARGS)
    assert cli["result"] == "refused" and cli["reason"] == "the head pools with attention"

    _fake(monkeypatch, zoo_cli, (1, "", "Error: unexpected KeyError: 'x' (rerun with --debug for the traceback)\n"),
          inspect=(1, "", ""), folder=False)
    assert "not flexsurgeon's" in zoo_cli.check_cli(_record("refused"), ARGS)["reason"]

    _fake(monkeypatch, zoo_cli, (1, "", "Error: a\nError: b\n"), inspect=(1, "", ""), folder=True)
    cli = zoo_cli.check_cli(_record("refused"), ARGS)
    assert cli["result"] == "failed" and "2 'Error:' lines" in cli["reason"]
    assert "left the output folder" in cli["reason"]


def test_cli_timeout_and_not_run(monkeypatch, zoo_cli):
    _fake(monkeypatch, zoo_cli, (None, "", ""), folder=False)
    assert zoo_cli.check_cli(_record("preserved"), ARGS)["result"] == "skipped"
    assert zoo_cli.check_cli(_record("skipped", img=None), ARGS)["result"] is None


def test_table_has_the_cli_column(tmp_path, zoo):
    records = [dict(_record("preserved"), seconds=1.0, cli={"result": "preserved", "reason": ""}),
               dict(_record("preserved", model="resnet18"), seconds=1.0,
                    cli={"result": "failed", "reason": "convert printed a traceback: RuntimeError: x"})]
    path = tmp_path / "t.md"
    zoo.write_table(records, {}, path, "python benchmarks/zoo_coverage.py --quick", True)
    text = path.read_text()
    assert "| model | family | outcome | CLI |" in text
    assert "Preserved through the API but not through the CLI: 1 (resnet18)." in text
    assert "**failed**: convert printed a traceback" in text


@pytest.mark.zoo
def test_cli_for_real(zoo_cli):
    """The real commands on a tiny model: converted, printed, saved, loaded by both loaders."""
    cli = zoo_cli.check_cli(_record("preserved"), SimpleNamespace(timeout=120))
    assert cli["result"] == "preserved", cli
    assert cli["convert_rc"] == 0 and cli["inspect_rc"] == 0 and cli["timm_loads"] is True


@pytest.mark.zoo
def test_a_model_that_fails_at_the_small_size_is_tried_as_built_for_its_own(zoo):
    """CrossViT cannot be built for 64x64; at its own 240x240 the walk must use the model built for
    240, not the one it built for 64 (which once made it record a refusal)."""
    record = zoo.check_model("crossvit_tiny_240", SimpleNamespace(timeout=120, max_params=300, roundtrip=False))
    assert (record["outcome"], record["img"]) == ("preserved", "240x240"), record
