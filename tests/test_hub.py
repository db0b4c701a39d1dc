"""Hugging Face Hub: push (dry run and a mocked upload), and loading hf-hub: names from an offline cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.commands.publish import model_card

REPO = "someone/resnet18-flexpool"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# loads the repository three ways in a fresh process that has no network and an offline Hub cache
_LOAD_OFFLINE = """
import sys, timm, torch, flexsurgeon
from safetensors.torch import save_file
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
name = sys.argv[1]
out = {}
with torch.no_grad():
    out["timm"] = timm.create_model(name, pretrained=True).eval()(x)
    loaded = flexsurgeon.load(name).eval()
    out["flexsurgeon"] = loaded(x)
print(type(loaded).__name__, loaded.pretrained_cfg["hf_hub_id"])
save_file(out, sys.argv[2])
"""


def _as_hub_cache(files: Path, cache: Path, repo: str = REPO) -> None:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded snapshot of ``repo``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def _offline_cache(files: Path, tmp_path: Path, monkeypatch) -> None:
    """``files`` as the only repository of an offline Hub cache, for this process."""
    import huggingface_hub.constants

    _as_hub_cache(files, tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _load_offline(cache: Path, name: str, tmp_path: Path) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    out = tmp_path / "outputs.safetensors"
    done = subprocess.run([sys.executable, "-c", _LOAD_OFFLINE, name, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out)), done.stdout


def _expected(folder: Path) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return flexsurgeon.load(folder).eval()(x)


def _trained_looking(converted: Path, tmp_path: Path) -> Path:
    """The shared converted folder with FlexPool weights that are no longer uniform."""
    model = flexsurgeon.load(converted)
    with torch.no_grad():
        pool = model.get_submodule(model.flexsurgeon_plan.pools[0].module)
        pool.weight.normal_(generator=torch.Generator().manual_seed(3))
    return flexsurgeon.save(model, tmp_path / "trained")


def test_a_dry_run_folder_loads_from_an_offline_hub_cache_through_timm_and_flexsurgeon(converted, tmp_path):
    folder = _trained_looking(converted, tmp_path)
    out = tmp_path / "to-upload"
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run", str(out)])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output

    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and "flexsurgeon" in meta["tags"] and "license" in meta
    plan = flexsurgeon.load(folder).flexsurgeon_plan
    assert f"`{plan.source.name}`" in body and f"timm.create_model('hf-hub:{REPO}', pretrained=True)" in body
    assert f"| `{plan.pools[0].module}` | in place | {plan.pools[0].channels}x2x2 | softmax |" in body
    assert all(f"| `{tap.module}` |" in body for tap in plan.sac) and plan.sac

    cache = tmp_path / "hub-cache"
    _as_hub_cache(out, cache)
    outputs, stdout = _load_offline(cache, f"hf-hub:{REPO}", tmp_path)
    expected = _expected(folder)
    assert torch.equal(outputs["timm"], expected) and torch.equal(outputs["flexsurgeon"], expected)
    assert stdout.split() == ["ResNet", REPO]  # the user's own class, recorded as loaded from the Hub


def test_what_timms_own_save_for_hf_writes_from_a_converted_model_loads(converted, tmp_path, monkeypatch):
    from timm.models import save_for_hf

    folder = _trained_looking(converted, tmp_path)
    model = flexsurgeon.load(folder)
    saved = tmp_path / "timm-export"
    save_for_hf(model, str(saved), safe_serialization=True)
    config = json.loads((saved / "config.json").read_text())
    assert config["architecture"] == "flexsurgeon" and "plan" in config["model_args"]
    assert set(config["model_args"]) > {"plan", "num_classes"}  # timm adds what it records itself
    expected = _expected(folder)
    with torch.no_grad():
        assert torch.equal(flexsurgeon.load(saved).eval()(torch.randn(2, 3, 64, 64, generator=torch.Generator()
                                                                         .manual_seed(0))), expected)
    stripped = tmp_path / "timm-export-stripped"  # the heads dropped: the plan timm writes has none either
    save_for_hf(flexsurgeon.strip_sac_heads(model), str(stripped), safe_serialization=True)
    assert json.loads((stripped / "config.json").read_text())["model_args"]["plan"]["sac"] == []
    assert flexsurgeon.load(stripped).flexsurgeon_plan.sac == () and model.flexsurgeon_plan.sac
    _offline_cache(saved, tmp_path, monkeypatch)  # in this process (the dry-run test uses a fresh one)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()(x), expected)
        assert torch.equal(flexsurgeon.load(f"hf-hub:{REPO}").eval()(x), expected)


def test_model_args_that_would_reach_the_builder_from_a_file_are_refused(converted, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(converted, edited)
    config = json.loads((edited / "config.json").read_text())
    config["model_args"]["checkpoint_path"] = "/tmp/evil.pth"
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="checkpoint_path disagree with the plan"):
        flexsurgeon.load(edited)
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="checkpoint_path"):
        timm.create_model(f"local-dir:{edited}", pretrained=True)


class _FakeApi:
    """Stands in for huggingface_hub.HfApi: records what a push sends."""

    calls: list = []
    repos: dict = {}  # repo id -> its branches, as the Hub has them
    private: set = set()  # the private ones among them

    def __init__(self, **kwargs):
        pass

    def whoami(self):
        return {"name": "someone"}

    def repo_exists(self, repo_id):
        return repo_id in self.repos

    def list_repo_refs(self, repo_id):
        branches = [type("Ref", (), {"name": b})() for b in self.repos[repo_id]]
        return type("Refs", (), {"branches": branches})()

    def repo_info(self, repo_id):
        return type("Info", (), {"private": repo_id in self.private})()

    def delete_repo(self, repo_id):
        self.calls.append(("delete_repo", repo_id))

    def delete_branch(self, repo_id, branch):
        self.calls.append(("delete_branch", repo_id, branch))

    def create_repo(self, repo_id, private=False):
        assert repo_id not in self.repos
        self.repos[repo_id] = ["main"]
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch):
        assert branch not in self.repos[repo_id]
        self.repos[repo_id].append(branch)
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, files, commit_message, revision, card))
        return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


def test_push_uploads_the_folder_card_and_plots_in_one_commit(converted, tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "with-plots"
    shutil.copytree(converted, folder)
    (folder / "plots").mkdir()
    (folder / "plots" / "flexpool_weights.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _FakeApi.calls, _FakeApi.repos = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--private", "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in _FakeApi.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert _FakeApi.calls[0] == ("create_repo", REPO, True)
    _, repo, files, message, revision, card = _FakeApi.calls[2]
    assert (repo, revision) == (REPO, "v1")
    assert files == ["README.md", "config.json", "model.safetensors", "plots/flexpool_weights.png"]
    assert message.startswith("Add test_resnet with FlexPool (flexsurgeon ")
    assert "![flexpool_weights](plots/flexpool_weights.png)" in card
    assert f"pushed to {REPO}" in result.output


def test_a_dry_run_writes_the_plots_a_push_would_upload(converted, tmp_path):
    """A run folder that has been plotted holds plots/: the dry run writes them too, as the push would."""
    folder = tmp_path / "with-plots"
    shutil.copytree(converted, folder)
    (folder / "plots").mkdir()
    (folder / "plots" / "flexpool_weights.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "model.safetensors", "plots/flexpool_weights.png"]
    assert "![flexpool_weights](plots/flexpool_weights.png)" in (out / "README.md").read_text()


class _FailingUpload(_FakeApi):
    def upload_folder(self, *args, **kwargs):
        raise ConnectionError("Connection reset by peer")


@pytest.mark.parametrize("repos, revision, undone", [
    ({}, None, ("delete_repo", REPO)),  # a new repository is deleted again
    ({REPO: ["main"]}, "v2", ("delete_branch", REPO, "v2")),  # a new branch of an existing one
    ({REPO: ["main", "v2"]}, "v2", None),  # nothing was created: nothing is deleted
])
def test_a_failed_upload_leaves_no_empty_repository_or_branch(converted, monkeypatch, repos, revision, undone):
    import huggingface_hub

    _FailingUpload.calls, _FailingUpload.repos = [], {k: list(v) for k, v in repos.items()}
    monkeypatch.setattr(huggingface_hub, "HfApi", _FailingUpload)
    result = CliRunner().invoke(main, ["push", str(converted), REPO, *(["--revision", revision] if revision else [])])
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert f"push to {REPO} failed, nothing was uploaded" in result.output
    assert "Connection reset by peer" in result.output
    deletions = [c for c in _FailingUpload.calls if c[0].startswith("delete")]
    assert deletions == ([undone] if undone else [])
    assert ("it created is deleted again" in result.output) == (undone is not None)


def test_a_failed_upload_says_what_it_could_not_delete(converted, monkeypatch):
    import huggingface_hub

    class Offline(_FailingUpload):
        def delete_repo(self, repo_id):
            raise ConnectionError("Network is unreachable")

    Offline.calls, Offline.repos = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    result = CliRunner().invoke(main, ["push", str(converted), REPO])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert f"the empty repository {REPO} it created is left on the Hub: delete it there" in result.output


@pytest.mark.parametrize("private", [False, True])
def test_private_on_an_existing_repository_is_refused_unless_it_is_private_already(converted, monkeypatch, private):
    import huggingface_hub

    _FakeApi.calls, _FakeApi.repos = [], {REPO: ["main"]}
    monkeypatch.setattr(_FakeApi, "private", {REPO} if private else set())
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    result = CliRunner().invoke(main, ["push", str(converted), REPO, "--private"])
    if private:
        assert result.exit_code == 0 and [c[0] for c in _FakeApi.calls] == ["upload_folder"], result.output
    else:
        assert result.exit_code == 1 and len(result.output.splitlines()) == 1 and _FakeApi.calls == []
        assert f"{REPO} exists and is public: --private applies when push creates the repository" in result.output


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "OUT", "--private"], "--private and --revision apply to an upload"),
    (["--dry-run", "OUT", "--revision", "v1"], "--private and --revision apply to an upload"),
    (["--force"], "--force replaces the OUT of --dry-run"),
])
def test_push_options_that_cannot_apply_are_refused(converted, tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = CliRunner().invoke(main, ["push", str(converted), REPO, *args])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "out").exists()


def test_push_without_credentials_or_huggingface_hub_is_one_line(converted, tmp_path, monkeypatch):
    import huggingface_hub

    class NoToken(_FakeApi):
        def whoami(self):
            raise OSError("Token is required but no token found")

        def upload_folder(self, *args, **kwargs):
            raise AssertionError("nothing may be uploaded")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    result = CliRunner().invoke(main, ["push", str(converted), REPO])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot push to the Hub: Token is required" in result.output and len(result.output.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    result = CliRunner().invoke(main, ["push", str(converted), REPO])
    assert result.exit_code == 1 and "pip install 'flexsurgeon[hub]'" in result.output
    result = CliRunner().invoke(main, ["push", str(converted), "not a repo id"])
    assert result.exit_code == 1 and "is not a Hub repository" in result.output


def test_push_from_the_hub_is_refused_naming_export(tmp_path):
    result = CliRunner().invoke(main, ["push", f"hf-hub:{REPO}", "someone/copy", "--dry-run", str(tmp_path / "out")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"hf-hub:{REPO} is on the Hub already" in result.output and "flexsurgeon export" in result.output
    assert not (tmp_path / "out").exists()


def test_an_uncached_repository_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"cannot get config.json of hf-hub:someone/missing"):
        flexsurgeon.load("hf-hub:someone/missing")


def test_eval_scores_an_hf_hub_checkpoint_from_the_cache(converted, tmp_path, monkeypatch):
    out = tmp_path / "to-upload"
    assert CliRunner().invoke(main, ["push", str(converted), REPO, "--dry-run", str(out)]).exit_code == 0
    _offline_cache(out, tmp_path, monkeypatch)
    data = "synthetic:classes=4,train=32,val=16,size=64"
    result = CliRunner().invoke(main, ["eval", f"hf-hub:{REPO}", "--data", data, "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["model"] == f"hf-hub:{REPO}" and scores["count"] == 16


@pytest.mark.parametrize("data, named", [("/home/someone/private/pets", "`pets` (a local folder)"),
                                         ("synthetic:classes=4", "`synthetic:classes=4` (generated)"),
                                         ("torch/cifar10:/mnt/data", "`torch/cifar10` (timm's data sets)")])
def test_a_pushed_runs_card_names_its_data_set_without_a_local_path(converted, tmp_path, data, named):
    run = tmp_path / "run"
    shutil.copytree(converted, run / "best")
    (run / "log.jsonl").write_text("")
    (run / "run.json").write_text(json.dumps({"source": "resnet18", "data": data}))
    card = model_card(run, REPO)
    assert f"Fine-tuned on {named}." in card and "/home" not in card and "/mnt" not in card


def test_finetune_export_and_plot_take_a_converted_model_on_the_hub(converted, tmp_path, monkeypatch):
    """``hf-hub:ORG/NAME`` works wherever a converted folder does: finetune starts from it (its
    conversion kept, conversion options refused), export writes the same model and plot draws its
    weight maps (into the folder -o names: the Hub cache is no place for them)."""
    out = tmp_path / "to-upload"
    assert CliRunner().invoke(main, ["push", str(converted), REPO, "--dry-run", str(out)]).exit_code == 0
    _offline_cache(out, tmp_path, monkeypatch)
    name = f"hf-hub:{REPO}"

    exported = tmp_path / "exported"
    result = CliRunner().invoke(main, ["export", name, "--format", "safetensors", "-o", str(exported)])
    assert result.exit_code == 0, result.output
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = flexsurgeon.load(converted).eval()(x)
        torch.testing.assert_close(flexsurgeon.load(exported).eval()(x), expected)
        torch.testing.assert_close(timm.create_model(f"local-dir:{exported}", pretrained=True).eval()(x), expected)

    data = "synthetic:classes=4,train=32,val=16,size=64"
    run = tmp_path / "run"
    args = ["finetune", name, "--data", data, "--recipe", "smoke", "--epochs", "1", "--workers", "0", "-o", str(run)]
    refused = CliRunner().invoke(main, [*args, "--sac-stages", "1"])
    assert refused.exit_code == 1 and "--sac-stages applies when converting a model name" in refused.output
    assert not run.exists()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["source"] == name
    trained = flexsurgeon.load(run / "last")
    assert trained.flexsurgeon_plan == flexsurgeon.load(converted).flexsurgeon_plan

    refused = CliRunner().invoke(main, ["plot", name])
    assert refused.exit_code == 1 and refused.output == f"Error: plot {name} needs -o FOLDER for the PNGs\n"
    result = CliRunner().invoke(main, ["plot", name, "-o", str(tmp_path / "maps")])
    local = CliRunner().invoke(main, ["plot", str(converted), "-o", str(tmp_path / "local-maps")])
    assert result.exit_code == 0 and local.exit_code == 0, result.output + local.output
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(
        p.name for p in (tmp_path / "local-maps").iterdir()) != []


def test_a_timm_model_on_the_hub_converts_fine_tunes_and_scores_by_its_hf_hub_name(converted, tmp_path, monkeypatch):
    """``hf-hub:ORG/NAME`` of a plain timm model (as timm's push_to_hf_hub writes one) is a model to
    convert, as timm.create_model takes it; export and plot, which take converted models only, refuse it."""
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model("resnet10t", num_classes=4), str(tmp_path / "plain"),
                            safe_serialization=True)
    _offline_cache(tmp_path / "plain", tmp_path, monkeypatch)
    name = f"hf-hub:{REPO}"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = timm.create_model(name, pretrained=True).eval()(x)

    result = CliRunner().invoke(main, ["convert", name, "--img-size", "64", "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    loaded = flexsurgeon.load(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), want, rtol=0, atol=1e-5)  # the repository's own weights
    source = loaded.flexsurgeon_plan.source
    assert (source.library, source.name, source.weights) == ("timm", "resnet10t", name)

    data = "synthetic:classes=4,train=32,val=16,size=64"
    result = CliRunner().invoke(main, ["eval", name, "--data", data, "--workers", "0", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["count"] == 16, result.output
    result = CliRunner().invoke(main, ["finetune", name, "--data", data, "--recipe", "smoke", "--epochs", "1",
                                       "--img-size", "64", "--workers", "0", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert flexsurgeon.load(tmp_path / "run" / "last").flexsurgeon_plan.source.name == "resnet10t"

    result = CliRunner().invoke(main, ["export", name, "--format", "safetensors", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"{name}/config.json names architecture 'resnet10t', not 'flexsurgeon'" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["plot", name, "-o", str(tmp_path / "maps")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert "names architecture 'resnet10t', not 'flexsurgeon'" in result.output and not (tmp_path / "maps").exists()


def test_convert_refuses_a_converted_model_on_the_hub(converted, tmp_path, monkeypatch):
    out = tmp_path / "to-upload"
    assert CliRunner().invoke(main, ["push", str(converted), REPO, "--dry-run", str(out)]).exit_code == 0
    _offline_cache(out, tmp_path, monkeypatch)
    result = CliRunner().invoke(main, ["convert", f"hf-hub:{REPO}", "-o", str(tmp_path / "c")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"hf-hub:{REPO} holds a converted model already" in result.output and not (tmp_path / "c").exists()


def test_without_network_a_cached_repository_is_read_at_once_and_an_uncached_one_is_one_line(
        converted, tmp_path, monkeypatch):
    """With huggingface.co out of reach (no HF_HUB_OFFLINE, as on a user's machine), hf-hub: sources
    come from the Hub cache at once, not after the hub client's minute of retries, and a repository
    that is not cached is one line that says why."""
    import socket
    import time

    import huggingface_hub.constants

    out = tmp_path / "to-upload"
    assert CliRunner().invoke(main, ["push", str(converted), REPO, "--dry-run", str(out)]).exit_code == 0
    torch.manual_seed(0)
    plain = timm.create_model("resnet10t", num_classes=4)
    timm.models.save_for_hf(plain, str(tmp_path / "plain"), safe_serialization=True)
    cache = tmp_path / "hub-cache"
    _as_hub_cache(out, cache)
    _as_hub_cache(tmp_path / "plain", cache, "someone/plain")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    data = "synthetic:classes=4,train=32,val=16,size=64"
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["eval", f"hf-hub:{REPO}", "--data", data, "--workers", "0", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["count"] == 16, result.output
    result = CliRunner().invoke(main, ["convert", "hf-hub:someone/plain", "--img-size", "64",
                                       "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(flexsurgeon.load(tmp_path / "c").eval()(x), plain.eval()(x), rtol=0, atol=1e-5)
    missing = "hf-hub:someone/missing"
    for command in (["eval", missing, "--data", data], ["convert", missing, "-o", str(tmp_path / "m")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
        assert result.output.strip() == ("Error: cannot get config.json of hf-hub:someone/missing: no network "
                                         "(huggingface.co cannot be reached) and it is not in the Hugging Face cache")
    assert time.perf_counter() - started < 20  # the hub client alone retries for about 25 s per file


def test_hub_weights_that_do_not_fit_their_config_are_one_line(tmp_path, monkeypatch):
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model("resnet10t", num_classes=4), str(tmp_path / "plain"),
                            safe_serialization=True)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**config, "architecture": "resnet14t"}))
    _offline_cache(tmp_path / "plain", tmp_path, monkeypatch)
    result = CliRunner().invoke(main, ["convert", f"hf-hub:{REPO}", "--img-size", "64", "-o", str(tmp_path / "c")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: the weights of hf-hub:{REPO} do not load into resnet14t (Error(s) in "
                                    "loading state_dict for ResNet: "), result.output
    assert not (tmp_path / "c").exists()


def test_the_hub_host_is_read_in_a_fresh_process():
    """huggingface_hub loads its submodules lazily: what reads its settings must import them."""
    env = {**os.environ, "HF_ENDPOINT": "https://hub.example.org"}
    done = subprocess.run([sys.executable, "-c", "from flexsurgeon.hub import hub_host; print(hub_host())"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "hub.example.org", done.stderr[-2000:]
