"""Faults: SIGKILL at every step of a checkpoint save and at fixed points of finetune (mid-epoch,
mid-save), a full disk, and out-of-memory batches.

Kills run in forked children (torch is already imported there, so a child is cheap) that die
by a real SIGKILL: no ``finally`` block or cleanup runs, as with ``kill -9``.
What a user relies on afterwards: the folder loads and holds exactly the old or exactly the
new checkpoint, never a mix, and ``--resume`` finishes the run with the uninterrupted run's
weights.
"""
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import flexsurgeon
import flexsurgeon.checkpoints.folders as folders
import flexsurgeon.training.loop as train_loop
from flexsurgeon.cli.main import main
from flexsurgeon.errors import CheckpointError
from flexsurgeon.training.recipe import load_recipe
from flexsurgeon.training.run import run

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork")

MODEL = "test_resnet"  # timm's 0.4M-parameter test network: convert + save take a fraction of a second
CONVERT = ["--img-size", "64", "--num-classes", "4"]
DATA = "synthetic:classes=4,train=64,val=32"


# ---------------------------------------------------------------------------------------- helpers

def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _fork(child) -> int:
    """Run ``child()`` in a forked process and return its wait status. The child never returns
    into pytest; the faults it meets are installed in it at fixed points."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)  # as DataLoader workers do after a fork
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _die_after(owner, name: str, call: int = 1, when=lambda *args: True):
    """Patch ``owner.name`` (in the child) to SIGKILL the process right after its ``call``-th matching call."""
    original, seen = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args):
            seen[0] += 1
            if seen[0] == call:
                _die()
        return result

    setattr(owner, name, wrapper)


@contextlib.contextmanager
def _one_thread():
    """Forked children train on one thread; the runs they are compared with must too (sums differ otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _state(directory) -> dict:
    return flexsurgeon.load(directory).state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _leftovers(directory: Path) -> list[str]:
    """What killed saves left beside ``directory`` (not the lock file, which a dead holder does not hold)."""
    return sorted(p.name for p in directory.parent.iterdir()
                  if p.name.startswith(f".{directory.name}.") and p.name != f".{directory.name}.lock")


# ---------------------------------------------------------------------------------------- convert / save

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An old checkpoint folder, a weights file the new one is converted from, and both states."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(1)
    old = flexsurgeon.convert(MODEL, img_size=64, num_classes=4)
    flexsurgeon.save(old, root / "old")
    torch.manual_seed(2)
    save_file(timm.create_model(MODEL, num_classes=4).state_dict(), str(root / "new-source.safetensors"))
    torch.manual_seed(0)  # the CLI child seeds the same way, so its SAC heads start the same
    new = flexsurgeon.convert(MODEL, weights=root / "new-source.safetensors", img_size=64, num_classes=4)
    return {"old_dir": root / "old", "weights": root / "new-source.safetensors",
            "old": _state(root / "old"), "new": new.state_dict(), "new_model": new}


def _truncate_then_die(path: str):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    _die()


def _half_written_weights():
    import safetensors.torch

    original = safetensors.torch.save_model

    def write_half(model, filename, *args, **kwargs):
        original(model, filename, *args, **kwargs)
        _truncate_then_die(filename)

    safetensors.torch.save_model = write_half


def _no_exchange():
    folders._exchange = lambda a, b: False  # what the save does where renameat2 is missing (macOS, NFS)


def _partial_cleanup():
    original = shutil.rmtree

    def remove_one_file_then_die(path, *args, **kwargs):
        if Path(path).name.startswith(".ck."):
            os.remove(next(p for p in Path(path).iterdir() if p.is_file()))
            _die()
        original(path, *args, **kwargs)

    shutil.rmtree = remove_one_file_then_die


KILL_POINTS = {  # where the kill lands -> what the folder must hold afterwards
    "while writing model.safetensors": (_half_written_weights, "old"),
    "after writing, before the swap": (lambda: _die_after(folders, "_fsync_tree"), "old"),
    "right after the atomic exchange": (lambda: _die_after(folders, "_exchange"), "new"),
    "while deleting the previous copy": (_partial_cleanup, "new"),
    "two-rename fallback: between the renames": (lambda: (_no_exchange(), _die_after(folders, "_rename", 1)), "old"),
    "two-rename fallback: after both renames": (lambda: (_no_exchange(), _die_after(folders, "_rename", 2)), "new"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_convert_killed_at_each_step_of_replacing_a_checkpoint_leaves_old_or_new(checkpoints, tmp_path, point):
    install, expected = KILL_POINTS[point]
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["old_dir"], ck)

    def child():
        install()
        torch.manual_seed(0)
        main.main(["convert", MODEL, "--weights", str(checkpoints["weights"]), *CONVERT, "-o", str(ck), "--force"],
                  standalone_mode=False)

    assert _killed(_fork(child)), "the child was not killed at the planned point"
    if point == "two-rename fallback: between the renames":
        assert not ck.exists() and any(".old-" in name for name in _leftovers(ck))  # the dangerous moment
        with pytest.raises(CheckpointError, match="is missing because a save was interrupted"):
            flexsurgeon.load(ck)  # loading names the previous copy and renames nothing
        assert not ck.exists()
        folders.recover(ck)  # the explicit recovery a writer runs
    assert _same(_state(ck), checkpoints[expected])
    # the next save removes what the killed one left behind
    flexsurgeon.save(checkpoints["new_model"], ck, force=True)
    assert _leftovers(ck) == [] and _same(_state(ck), checkpoints["new"])


def _save_killed_between_the_two_renames(checkpoints, tmp_path):
    """A forced save over the old checkpoint, killed after moving it aside (the fallback path)."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["old_dir"], ck)

    def child():
        _no_exchange()
        _die_after(folders, "_rename", 1)
        flexsurgeon.save(checkpoints["new_model"], ck, force=True)

    return ck, _fork(child)


def test_without_force_a_recovered_checkpoint_is_not_overwritten(checkpoints, tmp_path):
    ck, status = _save_killed_between_the_two_renames(checkpoints, tmp_path)
    assert _killed(status) and not ck.exists()
    code, output = _cli("convert", MODEL, "--weights", checkpoints["weights"], *CONVERT, "-o", ck)
    assert code == 1 and "already exists; pass --force" in output
    assert _same(_state(ck), checkpoints["old"]) and _leftovers(ck) == []


def test_load_names_the_copy_a_killed_save_moved_aside_and_renames_nothing(checkpoints, tmp_path):
    ck, status = _save_killed_between_the_two_renames(checkpoints, tmp_path)
    assert _killed(status)
    (old,) = [tmp_path / name for name in _leftovers(ck) if ".old-" in name]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = _cli("eval", ck, "--data", DATA)
    assert code == 1 and output.strip().splitlines()[-1].startswith(
        f"Error: {ck} is missing because a save was interrupted; the previous checkpoint is in {old}: rename it to ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_when_the_previous_copy_cannot_be_put_back_the_writer_names_it(checkpoints, tmp_path, monkeypatch):
    ck, status = _save_killed_between_the_two_renames(checkpoints, tmp_path)
    assert _killed(status)
    (old,) = [tmp_path / name for name in _leftovers(ck) if ".old-" in name]

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))

    monkeypatch.setattr(folders, "_rename", read_only)
    with pytest.raises(CheckpointError, match=f"{ck} is missing because a save was interrupted; the previous "
                                              f"checkpoint is in {old}: rename it to ck"):
        flexsurgeon.save(checkpoints["new_model"], ck, force=True)
    monkeypatch.undo()
    folders.recover(ck)
    assert _same(_state(ck), checkpoints["old"])


# ---------------------------------------------------------------------------------------- finetune

RECIPE = dict(epochs=3, batch_size=16, ema=True, sched="onecycle")


def _quiet(*args):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, with a copy of every checkpoint it wrote (last/ by epoch, best/ in order)."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    flexsurgeon.save(flexsurgeon.convert(MODEL, img_size=64, num_classes=4), root / "converted")
    snapshots = {"last": {}, "best": []}
    original, count = train_loop.save, iter(range(100))

    def save_and_copy(model, directory, *args, **kwargs):
        path = original(model, directory, *args, **kwargs)
        copy = root / "snapshots" / f"{path.name}-{next(count)}"
        shutil.copytree(path, copy)
        if path.name == "last":
            snapshots["last"][json.loads((path / "training_state.json").read_text())["epoch"]] = copy
        else:
            snapshots["best"].append(copy)
        return path

    train_loop.save = save_and_copy  # where the run saves its checkpoints
    try:
        with _one_thread():
            run(str(root / "converted"), DATA, load_recipe("smoke").replace(**RECIPE), root / "run",
                progress=False, log=_quiet)
    finally:
        train_loop.save = original
    assert sorted(snapshots["last"]) == [1, 2, 3]
    return {"converted": root / "converted", "run": root / "run", "snapshots": snapshots}


def _training_state(directory: Path) -> dict:
    return load_file(str(directory / "training_state.safetensors"))


def _assert_consistent(out: Path, reference) -> None:
    """What a kill left is a complete checkpoint of the uninterrupted run: weights and training state agree."""
    snaps = reference["snapshots"]
    if (out / "last").exists():
        epoch = json.loads((out / "last" / "training_state.json").read_text())["epoch"]
        expected = snaps["last"][epoch]
        assert _same(_state(out / "last"), _state(expected)), f"last/ is not epoch {epoch}'s checkpoint"
        assert _same(_training_state(out / "last"), _training_state(expected))
    if (out / "best").exists():
        best = _state(out / "best")
        assert any(_same(best, _state(s)) for s in snaps["best"]), "best/ is not one the run wrote"


def _finetune_child(reference, out: Path, install=None):
    def child():
        if install is not None:
            install()
        resume = (out / "last" / "training_state.json").is_file()
        run(str(reference["converted"]), DATA, load_recipe("smoke").replace(**RECIPE), out, resume=resume,
            progress=False, log=_quiet)
    return child


def _records_by_epoch(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["epoch"]: {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in records}


def _die_at_backward(call: int):
    """Patch the child to SIGKILL itself at its ``call``-th backward pass (mid-epoch)."""
    original, seen = torch.Tensor.backward, [0]

    def backward(*args, **kwargs):
        seen[0] += 1
        if seen[0] == call:
            _die()
        return original(*args, **kwargs)

    torch.Tensor.backward = backward


def test_finetune_killed_mid_epoch_and_mid_save_resumes_to_the_same_weights(reference, tmp_path):
    out = tmp_path / "run"
    plan = [  # each kill is followed by a run with --resume (or a fresh one when no last/ was completed yet)
        # epoch 1's last/ written to its temporary folder, not yet renamed into place
        lambda: _die_after(folders, "_fsync_tree", when=lambda tmp: tmp.name.startswith(".last.tmp-")),
        # epoch 2's last/ exchanged with epoch 1's, which is not yet deleted
        lambda: _die_after(folders, "_exchange", when=lambda new, directory: directory.name == "last"),
        # the middle of epoch 3
        lambda: _die_at_backward(2),
        # epoch 3's first checkpoint written to its temporary folder
        lambda: _die_after(folders, "_fsync_tree"),
    ]
    for install in plan:
        assert _killed(_fork(_finetune_child(reference, out, install))), "the run was not killed at the planned point"
        _assert_consistent(out, reference)

    with _one_thread():
        run(str(reference["converted"]), DATA, load_recipe("smoke").replace(**RECIPE), out,
            resume=(out / "last" / "training_state.json").is_file(), progress=False, log=_quiet)
    final = reference["snapshots"]["last"][3]
    assert _same(_state(out / "last"), _state(final))
    assert _same(_training_state(out / "last"), _training_state(final))
    assert _same(_state(out / "best"), _state(reference["run"] / "best"))
    # an epoch a kill interrupted after its log line is logged again when it is redone
    assert _records_by_epoch(out) == _records_by_epoch(reference["run"])
    assert _leftovers(out / "last") == [] and _leftovers(out / "best") == []


def test_a_run_killed_after_its_last_checkpoint_is_tidied_by_the_resume_that_has_nothing_left_to_train(
        reference, tmp_path):
    out = tmp_path / "run"
    # epoch 3's last/ exchanged with epoch 2's, which is not yet deleted: the run's work is all saved
    def install():
        _die_after(folders, "_exchange", call=2, when=lambda new, directory: directory.name == "last")

    assert _killed(_fork(_finetune_child(reference, out, install)))
    assert _leftovers(out / "last")
    with _one_thread():
        run(str(reference["converted"]), DATA, load_recipe("smoke").replace(**RECIPE), out, resume=True,
            progress=False, log=_quiet)
    assert _same(_state(out / "last"), _state(reference["snapshots"]["last"][3]))
    assert _leftovers(out / "last") == [] and _leftovers(out / "best") == []


# ---------------------------------------------------------------------------------------- full disk

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
                          capture_output=True).returncode == 0


_FULL_DISK_SCRIPT = r"""
import json, os, sys
import torch
from click.testing import CliRunner
import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.errors import CheckpointError

disk, old_dir, weights = sys.argv[1:4]
old = flexsurgeon.load(old_dir)
target = os.path.join(disk, "ck")
flexsurgeon.save(old, target)  # fits: the disk holds one and a half checkpoints
result = {}
try:
    flexsurgeon.save(flexsurgeon.convert("test_resnet", weights=weights, img_size=64, num_classes=4), target,
                     force=True)
except CheckpointError as exc:
    result["library"] = str(exc)
cli = CliRunner().invoke(main, ["convert", "test_resnet", "--weights", weights, "--img-size", "64",
                                "--num-classes", "4", "-o", target, "--force"])
result["cli_code"], result["cli_output"] = cli.exit_code, cli.output
state, expected = flexsurgeon.load(target).state_dict(), old.state_dict()
result["old_kept"] = all(torch.equal(state[k], expected[k]) for k in expected)
result["entries"] = sorted(os.listdir(disk))
print(json.dumps(result))
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a user namespace to mount a small tmpfs")
def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(checkpoints, tmp_path):
    size = sum(p.stat().st_size for p in checkpoints["old_dir"].iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK_SCRIPT)
    mount = f"mount -t tmpfs -o size={int(size * 1.5) // 4096 * 4096 + 8192} tmpfs {disk}"
    command = f'{mount} && exec "$0" {script} {disk} {checkpoints["old_dir"]} {checkpoints["weights"]}'
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command, sys.executable],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "No space left on device" in result["library"] and "previous checkpoint there is unchanged" in \
        result["library"]
    errors = [line for line in result["cli_output"].splitlines() if line.startswith("Error:")]
    assert result["cli_code"] == 1 and len(errors) == 1 and "No space left on device" in errors[0]
    assert "Traceback" not in result["cli_output"]
    assert result["old_kept"] and result["entries"] == ["ck"]  # no half-written temporary folders


_READ_ONLY_SCRIPT = r"""
import json, sys
import torch
from click.testing import CliRunner
import flexsurgeon
from flexsurgeon.cli.main import main
from flexsurgeon.errors import CheckpointError

disk, converted = sys.argv[1:3]
result = {}
try:
    flexsurgeon.save(flexsurgeon.load(converted), disk + "/ck")
except CheckpointError as exc:
    result["library"] = str(exc)
for name, args in (("convert", ["convert", "test_resnet", "--random-init", "--img-size", "64", "-o", disk + "/ck"]),
                   ("finetune", ["finetune", converted, "--data", "synthetic:classes=4,train=16,val=8",
                                 "--recipe", "smoke", "-o", disk + "/run"])):
    cli = CliRunner().invoke(main, args)
    result[name] = [cli.exit_code, cli.output]
print(json.dumps(result))
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a user namespace to mount a tmpfs")
def test_a_read_only_output_is_one_line_naming_the_users_path(checkpoints, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "read_only.py"
    script.write_text(_READ_ONLY_SCRIPT)
    command = f'mount -t tmpfs -o ro,size=64k tmpfs {disk} && exec "$0" {script} {disk} {checkpoints["old_dir"]}'
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command, sys.executable],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["library"] == f"could not write {disk}/ck: Read-only file system"
    for name, path in (("convert", disk / "ck"), ("finetune", disk / "run")):
        code, output = result[name]
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code == 1 and errors == [f"Error: could not write {path}: Read-only file system"], output
        assert ".tmp-" not in output and "Traceback" not in output


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def test_a_full_disk_during_finetune_stops_clearly_keeps_last_and_resume_finishes(reference, tmp_path, monkeypatch):
    import safetensors.torch

    original, saves_of_last = safetensors.torch.save_model, []

    def disk_full_on_second_last(model, filename, *args, **kwargs):
        if Path(filename).parent.name.startswith(".last."):
            saves_of_last.append(filename)
            if len(saves_of_last) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return original(model, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full_on_second_last)
    out = tmp_path / "run"
    args = ["finetune", reference["converted"], "--data", DATA, "--recipe", "smoke", "--epochs", "3",
            "--batch-size", "16", "--set", "ema=true", "--set", "sched=onecycle", "-o", out]
    with _one_thread():
        code, output = _cli(*args)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1, output
    assert f"could not write {out / 'last'}: No space left on device" in errors[0]
    assert "previous checkpoint there is unchanged" in errors[0]
    assert json.loads((out / "last" / "training_state.json").read_text())["epoch"] == 1
    assert _same(_state(out / "last"), _state(reference["snapshots"]["last"][1]))
    assert _leftovers(out / "last") == []

    monkeypatch.setattr(safetensors.torch, "save_model", original)  # space freed
    with _one_thread():
        code, output = _cli(*args, "--resume")
    assert code == 0, output
    assert _same(_state(out / "last"), _state(reference["snapshots"]["last"][3]))


# ---------------------------------------------------------------------------------------- out of memory

CPU_OOM = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes. "
                       "Error code 12 (Cannot allocate memory)")


def _patch_forward_with_sac(monkeypatch, replacement):
    """Where finetune calls it: the training forward and the evaluation."""
    for module in ("flexsurgeon.training.loop", "flexsurgeon.training.metrics"):
        monkeypatch.setattr(f"{module}.forward_with_sac", replacement)


@pytest.mark.parametrize("error,phase,message", [
    (CPU_OOM, "train", "out of CPU memory training at batch size 16; try --batch-size 8"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "train",
     "out of GPU memory training at batch size 16; try --batch-size 8"),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), "train",
     "out of MPS memory training at batch size 16; try --batch-size 8"),
    (CPU_OOM, "eval", "out of CPU memory evaluating at batch size 16; try --batch-size 8"),
])
def test_out_of_memory_is_one_line_suggesting_a_smaller_batch(reference, tmp_path, monkeypatch, error, phase, message):
    from flexsurgeon.surgery.sac import forward_with_sac as original

    def forward_with_sac(model, x):
        if model.training == (phase == "train"):
            raise error
        return original(model, x)

    _patch_forward_with_sac(monkeypatch, forward_with_sac)
    code, output = _cli("finetune", reference["converted"], "--data", DATA, "--recipe", "smoke",
                        "--batch-size", "16", "-o", tmp_path / "run")
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and errors == [f"Error: {message}"], output


def test_a_batch_of_one_that_does_not_fit_says_so(reference, tmp_path, monkeypatch):
    def forward_with_sac(model, x):
        raise CPU_OOM

    _patch_forward_with_sac(monkeypatch, forward_with_sac)
    code, output = _cli("finetune", reference["converted"], "--data", DATA, "--recipe", "smoke",
                        "--batch-size", "1", "-o", tmp_path / "run")
    assert code == 1 and "batch size is already 1: try a smaller --img-size or model" in output


def test_other_runtime_errors_are_not_reported_as_out_of_memory(reference, tmp_path, monkeypatch):
    def forward_with_sac(model, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x96 and 95x4)")

    _patch_forward_with_sac(monkeypatch, forward_with_sac)
    code, output = _cli("finetune", reference["converted"], "--data", DATA, "--recipe", "smoke",
                        "--batch-size", "16", "-o", tmp_path / "run")
    assert code == 1 and "memory" not in output and "shapes cannot be multiplied" in output


class _KilledInWorker(torch.utils.data.Dataset):
    """A data set whose loader worker is killed (as the OOM killer would) at its first image."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3, 8, 8), 0


def test_a_killed_loader_worker_is_a_clear_training_error():
    from flexsurgeon.data.loaders import make_loader
    from flexsurgeon.errors import TrainingError
    from flexsurgeon.training.metrics import evaluate

    loader = make_loader(_KilledInWorker(), batch_size=4, train=False, seed=0, num_workers=1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(TrainingError, match="data loader worker died while evaluating .*fewer --workers"):
        evaluate(model, loader)
