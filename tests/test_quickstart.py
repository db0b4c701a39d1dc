"""The README's main command: examples/quickstart.sh runs end to end and shows a learned result."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "quickstart.sh"


def test_quickstart_converts_finetunes_and_loads_the_best_checkpoint_through_timm(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, WORK=str(tmp_path))
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"timm\.create_model\('local-dir:.*/runs/quickstart/best'\): ResNet, "
                         r"val top-1 ([\d.]+)% on 128 images \(4 classes, chance 25%\)", line)
    assert match, line
    assert float(match.group(1)) >= 90.0, line  # what the README promises (chance is 25%)
    assert (tmp_path / "runs" / "quickstart" / "last" / "model.safetensors").is_file()
