"""The zoo walk's command-line check: a walked model through ``python -m flexsurgeon convert`` and
``inspect`` in a hermetic subprocess, as a user runs them (see ``zoo_coverage.py``)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from zoo_common import NUM_CLASSES, Timeout, clip, eval_output, first_line, time_limit

import flexsurgeon
from flexsurgeon.surgery.convert import PRESERVATION_TOLERANCE

_TRACEBACK = "Traceback (most recent call last)"
_COSTS_HEADER = re.compile(r"^\s+model\s+parameters\s+multiply-adds\b")
_NO_NETWORK = "http://127.0.0.1:9"  # the discard port: nothing listens, so a download fails at once


def _cli_env(home: Path) -> dict[str, str]:
    """The environment of the CLI subprocesses: offline, no GPU, empty caches, this checkout's package."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("no_proxy", "hf_token", "hugging_face_hub_token", "pythonstartup")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               CUDA_VISIBLE_DEVICES="", HF_HOME=str(home / "hf"), TORCH_HOME=str(home / "torch"),
               XDG_CACHE_HOME=str(home / "cache"), OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join(filter(None, (str(Path(flexsurgeon.__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH")))))
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = _NO_NETWORK
    return env


def _run_cli(argv: list[str], env: dict, cwd: Path, timeout: int) -> tuple[int | None, str, str]:
    """(exit code or None on a timeout, stdout, stderr) of ``python -m flexsurgeon ARGV``."""
    try:
        done = subprocess.run([sys.executable, "-m", "flexsurgeon", *argv], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return None, text(exc.stdout), text(exc.stderr)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _load_checks(folder: Path, size: tuple[int, int], timeout: int) -> tuple[bool, bool | None, str]:
    """(flexsurgeon.load works, timm's local-dir works (None: not tried), why not): both give an eval
    output of (2, NUM_CLASSES) for the same input, and the two outputs agree."""
    import timm

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    try:
        with time_limit(timeout):
            ours = eval_output(flexsurgeon.load(folder), x)
            if not isinstance(ours, torch.Tensor) or tuple(ours.shape) != (2, NUM_CLASSES):
                shape = tuple(ours.shape) if isinstance(ours, torch.Tensor) else type(ours).__name__
                return False, None, f"flexsurgeon.load's model gives {shape}, not (2, {NUM_CLASSES})"
    except (Exception, Timeout) as exc:  # noqa: BLE001 - any failure to load is the finding
        return False, None, f"flexsurgeon.load fails: {type(exc).__name__}: {first_line(exc)}"
    try:
        with time_limit(timeout):
            theirs = eval_output(timm.create_model(f"local-dir:{folder}", pretrained=True), x)
    except (Exception, Timeout) as exc:  # noqa: BLE001
        return True, False, f"timm local-dir fails: {type(exc).__name__}: {first_line(exc)}"
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape or not torch.allclose(
            theirs, ours, rtol=0, atol=PRESERVATION_TOLERANCE * max(1.0, ours.abs().max().item()), equal_nan=True):
        return True, False, "timm local-dir's model gives another output than flexsurgeon.load's"
    return True, True, ""


def check_cli(record: dict, args) -> dict:
    """Run the walked model through ``flexsurgeon convert`` and ``inspect`` as a user would (see the
    module's docstring); the result for ``record['cli']``."""
    start = time.time()
    label, api = record["model"], record["outcome"]
    if api in ("skipped", "not-walked") or not record.get("img"):
        return {"result": None, "reason": "not run: the API walk tried no input size"}
    size = tuple(int(v) for v in record["img"].split("x"))
    img = str(size[0]) if size[0] == size[1] else record["img"]
    common = ["--img-size", img, "--num-classes", str(NUM_CLASSES)]
    cli = {"result": None, "reason": "", "convert_rc": None, "converted_line": False, "costs_table": False,
           "saved_line": False, "stderr_clean": None, "error_lines": None, "folder": None, "lock_left": None,
           "loads": None, "timm_loads": None, "inspect_rc": None}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zoo_cli_") as tmp:
        tmp = Path(tmp)
        out, home = tmp / "out", tmp / "home"
        home.mkdir()
        env = _cli_env(home)
        rc, stdout, stderr = _run_cli(["convert", label, "--random-init", *common, "-o", str(out)], env, tmp,
                                      args.timeout)
        lines = stdout.splitlines()
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        cli.update(convert_rc=rc, converted_line=any(line.startswith(f"converted {label}:") for line in lines),
                   costs_table=any(_COSTS_HEADER.match(line) for line in lines)
                   and not any("costs not measured" in line for line in lines),
                   saved_line=any(line.startswith(f"saved {out}/") for line in lines),
                   stderr_clean=_TRACEBACK not in stderr, error_lines=len(errors),
                   folder=out.is_dir(), lock_left=(tmp / ".out.lock").exists())
        if rc is None:
            cli.update(result="skipped", reason=f"convert timed out after {args.timeout}s",
                       seconds=round(time.time() - start, 1))
            return cli
        if not cli["stderr_clean"]:
            problems.append(f"convert printed a traceback: {_last_line(stderr)}")
        if cli["lock_left"]:
            problems.append("convert left its lock file behind")
        if rc == 0:
            if api != "preserved":
                problems.append(f"convert exits 0 where the API walk says {api}")
            missing = [what for what, key in (("the 'converted ...' line", "converted_line"),
                                              ("the costs table", "costs_table"), ("the 'saved ...' line",
                                                                                  "saved_line")) if not cli[key]]
            if missing:
                warning = next((line.strip() for line in lines if "costs not measured" in line), "")
                problems.append("convert's output lacks " + ", ".join(missing) + (f" ({warning})" if warning else ""))
            if errors:
                problems.append(f"convert exits 0 but printed {errors[0]}")
            if not cli["folder"]:
                problems.append("convert exits 0 but wrote no folder")
            else:
                cli["loads"], cli["timm_loads"], why = _load_checks(out, size, args.timeout)
                if why:
                    problems.append(why)
        elif rc == 1:
            if api == "preserved":
                problems.append("convert refuses where the API walk preserved: "
                                + (errors[0] if errors else _last_line(stderr) or "no message"))
            if len(errors) != 1:
                problems.append(f"convert exits 1 with {len(errors)} 'Error:' lines, not one"
                                + (f": {_last_line(stderr)}" if not errors else ""))
            elif errors[0].startswith("Error: unexpected "):  # friendly_errors' line for an error not ours
                problems.append(f"convert fails with an error that is not flexsurgeon's: {errors[0]}")
            if cli["folder"]:
                problems.append("convert exits 1 but left the output folder behind")
        else:
            problems.append(f"convert exits {rc}: " + (_last_line(stderr) or "no message"))
        irc, _, istderr = _run_cli(["inspect", label, *common], env, tmp, args.timeout)
        cli["inspect_rc"] = irc
        if irc is None:
            problems.append(f"inspect timed out after {args.timeout}s")
        else:
            if _TRACEBACK in istderr:
                cli["stderr_clean"] = False
                problems.append(f"inspect printed a traceback: {_last_line(istderr)}")
            expected = 0 if rc == 0 else 1
            if irc != expected:
                problems.append(f"inspect exits {irc} where convert exits {rc}"
                                + (f": {_last_line(istderr)}" if irc not in (0, 1) or istderr.strip() else ""))
    if problems:
        cli.update(result="failed", reason=clip("; ".join(problems), 400))
    elif rc == 0:
        cli.update(result="preserved")
    else:
        cli.update(result="refused", reason=errors[0][len("Error:"):].strip())
    cli["seconds"] = round(time.time() - start, 1)
    return cli
