"""timm's own scripts on converted checkpoints: ``python -m flexsurgeon.launch SCRIPT.py ARGS``."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from flexsurgeon.commands.evaluate import evaluate_source

# what timm's validate.py does with --model and --data-dir, in a few lines
VALIDATE = textwrap.dedent("""
    import argparse

    import timm
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--data-dir")
    parser.add_argument("--num-classes", type=int, default=None)
    args = parser.parse_args()
    model = timm.create_model(args.model, pretrained=True, num_classes=args.num_classes).eval()
    config = resolve_data_config(vars(args), model=model)
    dataset = create_dataset("", root=args.data_dir, split="validation")
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=4, mean=config["mean"],
                           std=config["std"], crop_pct=config["crop_pct"], interpolation=config["interpolation"],
                           use_prefetcher=False, num_workers=0, device=torch.device("cpu"))
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    print(f"top1 {100 * correct / total:.4f} of {total}")
""")


def _image_folder(root, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(("ants", "bees", "cats", "dogs")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (72, 72, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.slow  # several seconds on 2 CPU cores: run with -m slow
def test_timms_validate_scores_a_converted_folder_as_flexsurgeon_eval_does(converted, tmp_path):
    data = _image_folder(tmp_path / "data")
    script = tmp_path / "validate.py"
    script.write_text(VALIDATE)
    args = ["--model", f"local-dir:{converted}", "--data-dir", str(data / "val")]

    plain = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert plain.returncode != 0 and "Unknown model (flexsurgeon)" in plain.stderr

    launched = subprocess.run([sys.executable, "-m", "flexsurgeon.launch", str(script), *args],
                              capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr
    ours = evaluate_source(str(converted), str(data), batch_size=4, workers=0, device="cpu", progress=False)
    assert launched.stdout.split() == ["top1", f"{ours['heads']['main']['top1']:.4f}", "of", str(ours["count"])]


def test_the_launcher_without_a_script_says_how_to_use_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flexsurgeon.launch"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "usage: python -m flexsurgeon.launch SCRIPT.py [ARGS...]"
    result = subprocess.run([sys.executable, "-m", "flexsurgeon.launch", str(tmp_path / "no.py")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"flexsurgeon.launch: no such script: {tmp_path / 'no.py'}"
