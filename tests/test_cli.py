import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.cli.report import pool_site
from flexsurgeon.surgery.plan import PoolEdit


def _run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_help_answers_without_importing_torch_or_timm():
    code = ("import sys; from flexsurgeon.cli.main import main; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import at --help'")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "flexsurgeon", "--help"], capture_output=True, text=True, check=True)
    assert "convert" in out.stdout and "inspect" in out.stdout


def test_convert_random_init_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "m"
    code, output = _run("convert", "resnet18", "--random-init", "--img-size", "64", "--num-classes", "5",
                        "-o", str(out))
    assert code == 0, output
    assert "FlexPool[softmax] at global_pool (in place); SAC heads: layer2.1.act2, layer3.1.act2" in output
    import flexsurgeon

    assert flexsurgeon.load(out).num_classes == 5


def test_the_same_convert_command_writes_the_same_weights_and_seed_changes_them(tmp_path):
    from safetensors.torch import load_file

    weights = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        code, output = _run("convert", "resnet18", "--random-init", "--img-size", "64", "--num-classes", "4",
                            "--seed", seed, "-o", str(tmp_path / name))
        assert code == 0, output
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(weights["a"][k].equal(weights["b"][k]) for k in weights["a"])
    assert not all(weights["a"][k].equal(weights["c"][k]) for k in weights["a"])


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    code, output = _run("convert", "resnet18", "--random-init", "--img-size", "64", "-o", str(out))
    assert code == 1 and "already exists; pass --force" in output
    code, output = _run("convert", "resnet18", "--random-init", "--img-size", "64", "-o", str(out), "--force")
    assert code == 0 and (out / "model.safetensors").is_file()


def test_pretrained_without_network_is_one_line_naming_the_alternatives(tmp_path):
    out = tmp_path / "m"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "flexsurgeon", "convert", "resnet18", "--img-size", "64",
                             "-o", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--weights FILE" in errors[0] and "--random-init" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["convert", "resnet5O", "--random-init", "-o", "{tmp}/x"], "unknown model 'resnet5O'; did you mean resnet50"),
    (["convert", "tv:resnt18", "--random-init", "-o", "{tmp}/x"], "did you mean tv:resnet18"),
    (["convert", "resnet18", "--random-init", "--img-size", "0", "-o", "{tmp}/x"], "is not a size"),
    (["convert", "resnet18", "--random-init", "--img-size", "abc", "-o", "{tmp}/x"], "is not a size"),
    (["convert", "resnet18", "--random-init", "--img-size", "64", "--sac-weights", "0.5,0.2,0.7",
      "-o", "{tmp}/x"], "must increase with depth"),
    (["convert", "resnet18", "--random-init", "--img-size", "64", "--sac-stages", "layr3", "-o", "{tmp}/x"],
     "did you mean"),
    (["convert", "resnet18", "--random-init", "--img-size", "64", "--pool", "max", "-o", "{tmp}/x"],
     "'max' is not one of"),
    (["convert", "resnet18", "--random-init", "--img-size", "32", "-o", "{tmp}/x"], "already 1x1"),
    (["convert", "inception_v3", "--random-init", "--img-size", "16", "-o", "{tmp}/x"], "too small"),
    (["convert", "resnet18", "--weights", "{tmp}/missing.pth", "--img-size", "64", "-o", "{tmp}/x"],
     "weights file not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, output = _run(*args)
    assert code != 0
    assert message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "x").exists()


def test_inspect_prints_pools_stages_and_the_plan():
    code, output = _run("inspect", "efficientnet_b0", "--img-size", "64")
    assert code == 0, output
    assert "global_pool_pool" in output and "head" in output and "gating" in output
    assert "replace the pool at global_pool (in place) with FlexPool[softmax] 1280x2x2" in output
    assert "attach a SAC head at add_1 (output of blocks.2.1)" in output


def test_inspect_json_is_machine_readable():
    code, output = _run("inspect", "resnet18", "--img-size", "64", "--json")
    assert code == 0
    data = json.loads(output)
    assert [s["reduction"] for s in data["stages"]] == [2, 4, 8, 16, 32]
    assert data["plan"]["sac_weights"] == [0.1, 0.2, 0.7]


def test_inspect_explains_a_refusal_with_nonzero_exit():
    code, output = _run("inspect", "test_vit3")  # timm's small ViT with attention pooling ('map')
    assert code == 1 and "refuse: the head at 'attn_pool." in output and "an attention pool" in output, output


def test_convert_weights_keeps_the_class_count_of_their_trained_head(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    import flexsurgeon

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "ten.safetensors"))
    common = ["convert", "resnet10t", "--weights", str(tmp_path / "ten.safetensors"), "--img-size", "64"]
    kept = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "kept")])
    assert kept.exit_code == 0, kept.output
    model = flexsurgeon.load(tmp_path / "kept")
    assert model.flexsurgeon_plan.num_classes == 10  # not timm's default 1000, which would drop the trained head
    assert torch.equal(model.get_classifier().weight, source.get_classifier().weight)
    with pytest.warns(UserWarning, match="a classifier for other classes.*re-initialised"):
        renewed = flexsurgeon.convert("resnet10t", weights=tmp_path / "ten.safetensors", img_size=64, num_classes=4)
    assert renewed.flexsurgeon_plan.num_classes == 4
    # on the command line the warning is one line of what it says, not a file, line number and code
    told = CliRunner().invoke(main, [*common, "--num-classes", "4", "-o", str(tmp_path / "renewed")])
    assert told.exit_code == 0, told.output
    assert told.stderr.splitlines() == ["warning: 2 tensors of ten.safetensors differ in shape (a classifier for other "
                                        "classes); they are re-initialised: fc.bias, fc.weight"]


NO_NETWORK = """
import socket, sys
def no_dns(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")
socket.getaddrinfo = no_dns
from flexsurgeon.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # several seconds on 2 CPU cores: run with -m slow
def test_pretrained_without_network_fails_at_once_or_uses_the_hub_cache(tmp_path):
    import time

    import timm
    import torch
    from safetensors.torch import save_file

    import flexsurgeon

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # as on a user's machine
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    args = [sys.executable, "-c", NO_NETWORK, "convert", "resnet10t", "--img-size", "64"]
    started = time.perf_counter()
    missing = subprocess.run([*args, "-o", str(tmp_path / "a")], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and time.perf_counter() - started < 30  # not the hub client's minute of retries
    assert missing.stderr.strip().splitlines()[-1] == (
        "Error: could not get pretrained weights for resnet10t: no network (huggingface.co cannot be reached) and "
        "they are not in the local cache; pass --weights FILE (a local state dict) or --random-init")

    # the same weights in the hub cache, as an earlier download left them
    snapshot = tmp_path / "hf" / "hub" / "models--timm--resnet10t.c3_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(3)
    cached = timm.create_model("resnet10t").state_dict()
    save_file(cached, str(snapshot / "snapshots" / ("0" * 40) / "model.safetensors"))
    found = subprocess.run([*args, "-o", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert found.returncode == 0, found.stderr[-2000:]
    converted = flexsurgeon.load(tmp_path / "b").state_dict()
    assert torch.equal(converted["conv1.0.weight"], cached["conv1.0.weight"])


def test_ctrl_c_after_the_save_says_the_folder_is_complete(tmp_path, monkeypatch):
    import flexsurgeon
    import flexsurgeon.cli.report

    def interrupted(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(flexsurgeon.cli.report, "converted_line", interrupted)
    out = tmp_path / "c"
    result = CliRunner().invoke(main, ["convert", "resnet18", "--random-init", "--img-size", "64", "-o", str(out)])
    assert result.exit_code == 130 and "Aborted!" not in result.output
    assert result.output.strip().splitlines()[-1] == f"interrupted after the save: {out} is complete"
    flexsurgeon.load(out)


def test_a_path_where_a_model_name_goes_says_what_it_is(tmp_path, monkeypatch):
    """A saved model folder, another folder or a weights file given as MODEL is named for what it
    is, not called an unknown model; a timm name still wins over a folder of the same name."""
    saved = flexsurgeon.save(flexsurgeon.convert("resnet10t", img_size=64, num_classes=3), tmp_path / "saved")
    (tmp_path / "weights.pth").write_bytes(b"")
    for source, message in ((saved, f"{saved} is a saved model folder, not a model name: a converted model is "
                                    f"converted already (fine-tune it: flexsurgeon finetune {saved} --data ...)"),
                            (tmp_path, f"{tmp_path} is a folder, not a model name: give a timm name, tv:NAME"),
                            (tmp_path / "weights.pth", "for a state dict, give the model's name and --weights FILE")):
        for command in (["convert", str(source), "-o", str(tmp_path / "x")], ["inspect", str(source)]):
            code, output = _run(*command)
            assert code == 1 and message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "x").exists()
    (tmp_path / "resnet10t").mkdir()
    monkeypatch.chdir(tmp_path)
    code, output = _run("inspect", "resnet10t", "--img-size", "64")
    assert code == 0 and "FlexPool" in output, output


def test_a_rewritten_pool_is_named_by_its_method_and_by_its_node_only_beside_another():
    def edit(node):
        return PoolEdit(node, "x", 8, (1, 5), layout="tokens", replacement="graph_rewrite", forward="forward_head")

    one = edit("getitem")
    assert pool_site(one, [one]) == "forward_head (graph rewrite)"
    two = [edit("getitem"), edit("getitem_1")]  # one class token per stream (CrossViT)
    assert [pool_site(e, two) for e in two] == ["forward_head, node getitem (graph rewrite)",
                                                "forward_head, node getitem_1 (graph rewrite)"]
    assert pool_site(PoolEdit("pool", "x", 8, (2, 2), module="global_pool")) == "global_pool (in place)"
