"""One writer per folder: a second finetune, convert or ablate on a folder in use refuses in one
line naming the holder, writes nothing there, and a killed holder keeps nothing."""
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from flexsurgeon.checkpoints.locks import hold
from flexsurgeon.cli.main import main

DATA = "synthetic:classes=4,train=32,val=16"
HOLDER = """
import sys, time
from flexsurgeon.checkpoints.locks import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run, as a running finetune does."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("command", ["finetune", "convert", "ablate"])
def test_a_folder_in_use_is_refused_naming_the_holder_and_left_alone(converted, holder, tmp_path, command):
    run = tmp_path / "run"
    args = {
        "finetune": ["finetune", converted, "--data", DATA, "--recipe", "smoke", "-o", run],
        "convert": ["convert", "resnet18", "--random-init", "--img-size", "64", "-o", run, "--force"],
        "ablate": ["ablate", "resnet18", "--data", DATA, "--recipe", "smoke", "--seeds", "1", "-o", run],
    }[command]
    code, errors = _cli(*args)
    assert code == 1 and errors == [
        f"Error: {run} is in use by process {holder.pid} (another flexsurgeon run writing there); "
        "wait for it to end or choose another output folder"]
    assert not run.exists()


def test_a_killed_holder_keeps_nothing_and_the_next_run_goes_ahead(converted, holder, tmp_path):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run = tmp_path / "run"
    code, errors = _cli("finetune", converted, "--data", DATA, "--recipe", "smoke", "--epochs", "1", "-o", run)
    assert code == 0 and errors == []
    assert (run / "last" / "training_state.json").is_file()
    assert not (tmp_path / ".run.lock").exists()  # removed when the run let go


def test_holding_a_folder_again_inside_the_same_process_is_allowed(tmp_path):
    with hold(tmp_path / "run"):
        with hold(tmp_path / "run"):
            pass
        assert (tmp_path / ".run.lock").read_text().strip().isdigit()
    assert not (tmp_path / ".run.lock").exists()
