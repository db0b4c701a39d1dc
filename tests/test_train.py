"""Fine-tuning end to end on CPU with synthetic data: checkpoints, logs, determinism,
resume after SIGKILL, freeze schedule, NaN stop, and 2-process DDP on gloo."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner

import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.data import load_data
from flexsurgeon.training.heads import head_parameter_names
from flexsurgeon.training.loop import finetune
from flexsurgeon.training.recipe import load_recipe

DATA = "synthetic:classes=4,train=96,val=64"
VOLATILE = {"seconds", "images_per_s"}


def _finetune(*args):
    result = CliRunner().invoke(main, ["finetune", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _stable(record):
    return {k: v for k, v in record.items() if k not in VOLATILE}


def test_smoke_run_writes_checkpoints_and_a_log_and_best_loads_in_timm(converted, tmp_path):
    run = tmp_path / "run"
    out = _finetune(converted, "--data", DATA, "--recipe", "smoke", "-o", run, "--batch-size", "32")
    assert "done: best val top-1" in out
    records = _log(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["frozen_backbone"] and not records[1]["frozen_backbone"]
    heads = ["sac:layer2_0_act2", "sac:layer3_0_act3", "main"]  # the default taps of timm's test_resnet
    for split in ("train", "val"):
        assert list(records[-1][split]["top1"]) == heads and list(records[-1][split]["loss"]) == heads
    assert records[-1]["val"]["count"] == 64 and records[-1]["images_per_s"] > 0
    assert "batch_size: 32" in (run / "recipe.yaml").read_text()
    # best/ drops the SAC heads by default, last/ keeps them for training
    best = timm.create_model(f"local-dir:{run / 'best'}", pretrained=True)
    assert len(best.sac_heads) == 0 and best.flexsurgeon_plan.sac == ()
    assert len(flexsurgeon.load(run / "last").sac_heads) == 2
    assert best(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_same_command_twice_gives_the_same_metrics(converted, tmp_path):
    for name in ("a", "b"):
        _finetune(converted, "--data", DATA, "--recipe", "smoke", "-o", tmp_path / name, "--batch-size", "32")
    assert [_stable(r) for r in _log(tmp_path / "a")] == [_stable(r) for r in _log(tmp_path / "b")]


def test_the_default_recipes_ema_warms_up_so_the_scored_weights_follow_the_training(converted, tmp_path):
    """timm's EMA warm-up, on in the default recipe: the decay starts near 0, so after a few steps
    best/ (the EMA) is close to the trained weights (last/); without it, the 0.999 EMA still holds
    the first step's (on a small data set, a fine-tune's best/ would be mostly its start)."""
    distance = {}
    for warmup in (False, True):
        run = tmp_path / str(warmup)
        _finetune(converted, "--data", DATA, "--epochs", "1", "--batch-size", "32", "--workers", "0", "-o", run,
                  "--set", "warmup_epochs=0", "--set", "freeze_epochs=0",
                  *(() if warmup else ("--set", "ema_warmup=false")))
        best, last = flexsurgeon.load(run / "best"), flexsurgeon.load(run / "last")
        distance[warmup] = (best.fc.weight - last.fc.weight).norm().item()
        assert yaml.safe_load((run / "recipe.yaml").read_text())["ema_warmup"] is warmup
    assert distance[True] < 0.6 * distance[False], distance


def test_finetune_takes_the_img_size_as_hxw_for_a_model_name(tmp_path):
    run = tmp_path / "run"
    _finetune("test_resnet", "--random-init", "--data", DATA, "--recipe", "smoke", "--epochs", "1",
              "--img-size", "48x64", "-o", run)
    model = flexsurgeon.load(run / "last")
    assert tuple(model.flexsurgeon_plan.img_size) == (48, 64)
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 48, 64)
    assert "img_size:\n- 48\n- 64" in (run / "last" / "recipe.yaml").read_text()


def test_num_classes_re_heads_a_converted_folder_for_data_with_other_classes(converted, tmp_path):
    run = tmp_path / "run"
    output = _finetune(converted, "--data", "synthetic:classes=6,train=96,val=60", "--recipe", "smoke",
                       "--epochs", "1", "--num-classes", "6", "-o", run)
    assert "re-initialised the classifier and the SAC heads for 6 classes (the checkpoint had 4)" in output
    model = timm.create_model(f"local-dir:{run / 'last'}", pretrained=True).eval()
    assert model.flexsurgeon_plan.num_classes == 6 and model.get_classifier().out_features == 6
    with torch.no_grad():
        logits, heads = flexsurgeon.forward_with_sac(model, torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 6) and all(h.shape == (2, 6) for h in heads)


def test_resume_before_the_first_checkpoint_starts_the_run_and_says_so(converted, tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # an empty run folder, as a preemptible job's first attempt may leave
    output = _finetune(converted, "--data", DATA, "--recipe", "smoke", "--epochs", "1", "-o", run, "--resume")
    assert f"nothing to resume in {run} yet: starting the run" in output
    assert [r["epoch"] for r in _log(run)] == [1] and (run / "last" / "training_state.json").is_file()


def test_ctrl_c_says_how_to_continue_and_resume_finishes_the_run(converted, tmp_path, monkeypatch):
    from flexsurgeon.training.loop import FinetuneRun

    run, original = tmp_path / "run", FinetuneRun.train_epoch

    def interrupted_in_the_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(FinetuneRun, "train_epoch", interrupted_in_the_second_epoch)
    args = ["finetune", str(converted), "--data", DATA, "--recipe", "smoke", "-o", str(run)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted: run the same command with --resume to continue from the last finished epoch in {run}/last")
    assert [r["epoch"] for r in _log(run)] == [1]
    monkeypatch.undo()
    _finetune(*args[1:], "--resume")
    assert [r["epoch"] for r in _log(run)] == [1, 2]


@pytest.mark.slow  # a real process killed and resumed through the CLI; test_faults.py covers kills in the default run
def test_a_run_killed_mid_epoch_resumes_to_the_same_result(converted, tmp_path):
    args = ["--data", "synthetic:classes=4,train=256,val=64", "--recipe", "smoke", "--epochs", "3",
            "--batch-size", "16", "--set", "ema=true", "--set", "sched=onecycle"]
    reference = tmp_path / "reference"
    _finetune(converted, *args, "-o", reference)

    run = tmp_path / "killed"
    # The child kills itself at a fixed point: the 4th backward pass of epoch 2 (16 steps an epoch).
    child = ("import os, signal, sys, torch\n"
             "from flexsurgeon.cli.main import main\n"
             "original, calls = torch.Tensor.backward, [0]\n"
             "def backward(*args, **kwargs):\n"
             "    calls[0] += 1\n"
             "    if calls[0] == 16 + 4:\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return original(*args, **kwargs)\n"
             "torch.Tensor.backward = backward\n"
             "main(sys.argv[1:])\n")
    cmd = [sys.executable, "-c", child, "finetune", str(converted), *args, "-o", str(run)]
    process = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert (run / "last" / "training_state.json").exists(), "the run never finished an epoch"
    epochs_done = len(_log(run))
    assert epochs_done == 1, "the kill did not land in epoch 2"
    flexsurgeon.load(run / "last")  # what a kill leaves behind is a complete checkpoint

    _finetune(converted, *args, "-o", run, "--resume")
    assert [_stable(r) for r in _log(run)] == [_stable(r) for r in _log(reference)]


def test_freeze_phase_trains_only_the_new_layers_and_the_classifier(converted, tmp_path):
    model = flexsurgeon.load(converted)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = load_recipe("smoke").replace(epochs=1, freeze_epochs=1, batch_size=32)
    data = load_data(DATA, data_config=timm.data.resolve_data_config(model=model))
    finetune(model, data, recipe, tmp_path / "run", progress=False, log=lambda *a: None)
    heads = set(head_parameter_names(model))
    assert "global_pool.weight" in heads and any(n.startswith("sac_heads.") for n in heads)
    assert "fc.weight" in heads
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in heads), name


class _PoisonAfter(torch.utils.data.Dataset):
    """Returns NaN images once ``limit`` items have been read: the loss goes NaN in epoch 2."""

    def __init__(self, dataset, limit):
        self.dataset, self.limit, self.reads = dataset, limit, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        x, y = self.dataset[index]
        return (torch.full_like(x, float("nan")) if self.reads > self.limit else x), y


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(converted, tmp_path):
    model = flexsurgeon.load(converted)
    data = load_data(DATA, data_config=timm.data.resolve_data_config(model=model))
    data.train = _PoisonAfter(data.train, limit=len(data.train))
    recipe = load_recipe("smoke").replace(epochs=3, batch_size=32)
    with pytest.raises(flexsurgeon.FlexSurgeonError, match=r"loss became nan at epoch 2.*last good checkpoint"):
        finetune(model, data, recipe, tmp_path / "run", progress=False, log=lambda *a: None)
    state = json.loads((tmp_path / "run" / "last" / "training_state.json").read_text())
    assert state["epoch"] == 1
    flexsurgeon.load(tmp_path / "run" / "last")


def test_a_model_name_is_converted_first(tmp_path):
    run = tmp_path / "run"
    _finetune("test_resnet", "--random-init", "--img-size", "64", "--data", DATA, "--recipe", "smoke",
              "--epochs", "1", "-o", run)
    assert flexsurgeon.load(run / "last").num_classes == 4


@pytest.mark.parametrize("args,message", [
    (["--sac-weights", "0.5,0.2,0.7"], "must increase with depth"),
    (["--set", "epochz=1"], "unknown recipe field 'epochz'"),
    (["--set", "lr=-1"], "'lr' = -1.0 must be positive"),
    (["--recipe", "nonesuch"], "recipe 'nonesuch' not found"),
    (["--data", "synthetic:classes=6"], "the model has 4 classes but the data has 6; pass --num-classes 6"),
    (["--data", "synthetic:classes=6", "--num-classes", "5"], "--num-classes 5 but the data has 6 classes"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--val-split", "0.2"], "--val-split carves val out of train, and synthetic:classes=4,train=96,val=64 has a val"),
    (["--set", "val_from_train=true"], "val_from_train carves val out of an image folder's or IDX files' train"),
])
def test_bad_finetune_input_is_one_line(converted, tmp_path, args, message):
    base = {"--data": DATA, "--recipe": "smoke"}
    for flag in args[::2]:
        base.pop(flag, None)
    flat = [x for kv in base.items() for x in kv]
    result = CliRunner().invoke(main, ["finetune", str(converted), *flat, *args, "-o", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r" / "last").exists()


@pytest.mark.slow  # several seconds on 2 CPU cores: run with -m slow
def test_two_processes_on_gloo_write_one_set_of_checkpoints_and_reduce_metrics(converted, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "flexsurgeon", "finetune", str(converted), "--data", "synthetic:classes=4,train=96,val=63",
           "--recipe", "smoke",
           "--batch-size", "16", "--device", "cpu", "-o", str(run)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "log.jsonl", "recipe.yaml", "run.json"]
    records = _log(run)
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["world_size"] == 2
    val = records[-1]["val"]
    assert len(val["per_rank"]) == 2
    # 63 samples: each counted once (shards of 32 and 31), not padded to 64
    assert [r["count"] for r in val["per_rank"]] == [32, 31] and val["count"] == 63
    hits = sum(r["main_top1_hits"] for r in val["per_rank"])
    assert val["top1"]["main"] == pytest.approx(100.0 * hits / val["count"])
    flexsurgeon.load(run / "last")
    assert result.stdout.count("done: best val top-1") == 1  # rank 1 prints nothing


def test_paper_recipe_with_mixup_runs_and_converts_with_its_settings(tmp_path):
    run = tmp_path / "paper"
    _finetune("test_resnet", "--random-init", "--img-size", "64", "--data", DATA, "--recipe", "paper",
              "--epochs", "1", "--batch-size", "32", "--workers", "0", "--set", "mixup=0.2", "-o", run)
    plan = flexsurgeon.load(run / "last").flexsurgeon_plan
    assert plan.pool == "linear" and plan.dropout == 0.25 and plan.sac_weights == (0.1, 0.2, 0.7)
    record = _log(run)[0]
    assert record["val"]["count"] == 64 and all(v == v for v in record["train"]["loss"].values())  # no NaN


def test_resume_drops_log_records_of_epochs_it_redoes(tmp_path):
    import json

    from flexsurgeon.runs.log import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "val": {}}) + "\n" for e in (1, 2, 3)) + '{"epoch": 4, "va')
    truncate_log(log, 2)  # last/ holds epoch 2: epochs 3 and 4 will be redone and logged again
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


def test_cuda_gets_bf16_channels_last_pinned_tf32_and_cpu_float32(monkeypatch):
    from flexsurgeon.training import setup as train_setup
    from flexsurgeon.training.setup import DeviceSettings, device_settings

    monkeypatch.setattr(train_setup, "_native_bf16", lambda: True)  # an Ampere or newer GPU
    quick = load_recipe("quick")
    assert device_settings(torch.device("cuda", 0), quick) == DeviceSettings(
        autocast=True, channels_last=True, pin_memory=True, tf32=True, sync_every=10)
    plain = device_settings(torch.device("cuda"), quick.replace(amp=False, channels_last=False))
    assert not plain.autocast and not plain.channels_last and plain.pin_memory
    assert device_settings(torch.device("cpu"), quick) == DeviceSettings()  # the recipe's amp is for CUDA
    monkeypatch.setattr(train_setup, "_native_bf16", lambda: False)  # V100, T4: float32, everything else as before
    assert device_settings(torch.device("cuda"), quick) == DeviceSettings(
        autocast=False, channels_last=True, pin_memory=True, tf32=True, sync_every=10)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_the_gpu_code_path_trains_on_cpu(tmp_path, monkeypatch, compiled):
    """What finetune does on CUDA (bf16 autocast, channels_last, pinned batches, loss read every
    few steps, optionally torch.compile), run here so CI covers that branch of the loop. The
    CUDA kernels themselves are checked by benchmarks/gpu_check.sh on a GPU machine. timm's small
    test ResNet on few small images: bf16 convolutions are slow on a CPU without native bf16."""
    from flexsurgeon.training import loop as train
    from flexsurgeon.training import setup as train_setup

    monkeypatch.setattr(train_setup, "_native_bf16", lambda: True)
    gpu = train.device_settings(torch.device("cuda"), load_recipe("quick"))
    monkeypatch.setattr(train, "device_settings", lambda device, recipe: gpu.__class__(
        **{**gpu.__dict__, "sync_every": 2}))
    # finetune turns TF32 and cudnn autotuning on: global switches (no effect on a CPU), put back below
    switches = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                (torch.backends.cudnn, "benchmark")]
    before = [getattr(module, name) for module, name in switches]
    for module, name in switches:
        setattr(module, name, False)
    converted = tmp_path / "test_resnet"
    torch.manual_seed(0)
    flexsurgeon.save(flexsurgeon.convert("test_resnet", img_size=48, num_classes=4), converted)
    try:
        _train_with_gpu_settings(converted, tmp_path, compiled)
        assert all(getattr(module, name) for module, name in switches)
    finally:
        for (module, name), value in zip(switches, before):
            setattr(module, name, value)


def _train_with_gpu_settings(converted, tmp_path, compiled):
    model = flexsurgeon.load(converted)
    seen = []  # what reaches FlexPool during training: dtype and layout
    if not compiled:  # a hook inside a compiled graph is traced, not run
        model.global_pool.register_forward_hook(lambda module, args, out: seen.append(
            (args[0].dtype, args[0].is_contiguous(memory_format=torch.channels_last), module.training)))
    lines = []
    recipe = load_recipe("smoke").replace(batch_size=16, compile=compiled)
    data = load_data("synthetic:classes=4,train=48,val=32", data_config=timm.data.resolve_data_config(model=model))
    finetune(model, data, recipe, tmp_path / "run", progress=False, log=lines.append)

    assert any(f"bf16 autocast, channels_last{', compiled' if compiled else ''}):" in line for line in lines), lines
    if not compiled:
        assert {s for s in seen if s[2]} == {(torch.bfloat16, True, True)}  # every training step
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    records = _log(tmp_path / "run")
    assert len(records) == 2 and all(math.isfinite(v) for r in records for v in r["train"]["loss"].values())
    assert records[-1]["val"]["count"] == 32
    best = timm.create_model(f"local-dir:{tmp_path / 'run' / 'best'}", pretrained=True).eval()
    assert best.conv1[0].weight.dtype == torch.float32  # autocast never changes the stored weights
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(best(x), best(x.contiguous(memory_format=torch.channels_last)),
                                   rtol=1e-4, atol=1e-4)


def test_scheduler_functions_are_left_out_of_the_saved_state_and_resume_still_steps():
    """torch 2.3's OneCycleLR keeps its annealing function in its state; JSON cannot hold it,
    and loading it back as None would break the scheduler."""
    from flexsurgeon.training.state import json_ready

    def make():
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)

    original = make()
    if not hasattr(original, "anneal_func"):  # newer torch: put a function in the state as 2.3 does
        original.anneal_func = original._annealing_cos
    for _ in range(3):
        original.optimizer.step()
        original.step()
    state = json.loads(json.dumps(json_ready(original.state_dict())))
    assert "anneal_func" not in state
    restored = make()
    restored.load_state_dict(state)
    for scheduler in (original, restored):
        scheduler.optimizer.step()
        scheduler.step()
    assert restored.get_last_lr() == original.get_last_lr()


def test_keep_sac_is_refused_for_a_model_without_sac_heads(tmp_path):
    folder = flexsurgeon.save(flexsurgeon.convert("resnet10t", img_size=64, num_classes=4, sac_stages=[]),
                              tmp_path / "no-heads")
    result = CliRunner().invoke(main, ["finetune", str(folder), "--data", DATA, "--recipe", "smoke", "--keep-sac",
                                       "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert "--keep-sac keeps the SAC heads in best/, and this model has none" in result.output
    assert not (tmp_path / "r").exists()


def test_a_model_that_could_not_be_saved_is_refused_before_training(tmp_path):
    class Net(torch.nn.Module):  # a custom model trained from Python without convert: no checkpoint for it
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    model = Net()
    data = load_data(DATA, data_config={"input_size": (3, 32, 32)})
    with pytest.raises(flexsurgeon.FlexSurgeonError, match="only models returned by flexsurgeon.convert"):
        finetune(model, data, load_recipe("smoke"), tmp_path / "run", progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_an_output_that_cannot_be_written_is_refused_before_training(converted, tmp_path):
    (tmp_path / "file").write_text("")
    code_output = CliRunner().invoke(main, ["finetune", str(converted), "--data", DATA, "--recipe", "smoke",
                                            "-o", str(tmp_path / "file" / "run")])
    assert code_output.exit_code == 1
    assert code_output.output.strip().splitlines()[-1].startswith(f"Error: could not write {tmp_path}/file/run: ")


def test_class_names_of_an_image_folder_travel_through_finetune_eval_export_and_timm(tmp_path):
    import numpy as np
    import onnx
    from PIL import Image

    rng = np.random.default_rng(0)
    names = ["cat", "dog", "fox"]
    for split, count in (("train", 8), ("val", 4)):
        for c, name in enumerate(names):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.png")
    run = tmp_path / "run"
    _finetune("test_resnet", "--random-init", "--img-size", "64", "--data", tmp_path / "data", "--recipe", "smoke",
              "--epochs", "1", "--batch-size", "8", "-o", run)
    model = timm.create_model(f"local-dir:{run / 'best'}", pretrained=True)
    assert list(model.pretrained_cfg["label_names"]) == names
    shown = CliRunner().invoke(main, ["eval", str(run), "--data", str(tmp_path / "data"), "--workers", "0"])
    assert shown.exit_code == 0 and "classes: cat, dog, fox" in shown.output.splitlines()
    exported = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert exported.exit_code == 0, exported.output
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(metadata["label_names"]) == names
