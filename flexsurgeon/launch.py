"""``python -m flexsurgeon.launch SCRIPT.py ARGS...``: run a script (timm's ``train.py``,
``validate.py``, ``inference.py``, or your own) with converted checkpoints loadable by timm.

A converted folder names the timm architecture ``flexsurgeon``, which exists once flexsurgeon
is imported. timm's scripts do not import it, so ``timm.create_model('local-dir:DIR')`` in them
stops at "Unknown model (flexsurgeon)". This imports flexsurgeon, then runs SCRIPT as
``__main__`` with ARGS, as ``python SCRIPT.py ARGS...`` would (its folder first on
``sys.path``). timm's ``train.py`` can also do it itself: ``--device-modules flexsurgeon``.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = "usage: python -m flexsurgeon.launch SCRIPT.py [ARGS...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    script = Path(argv[0])
    if not script.is_file():
        print(f"flexsurgeon.launch: no such script: {script}", file=sys.stderr)
        return 2
    from .checkpoints.timm_registry import register_timm_architecture  # torch and timm: after the checks

    register_timm_architecture()
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
