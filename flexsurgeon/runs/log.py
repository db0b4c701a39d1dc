"""A run's epoch log (``log.jsonl``): appending an epoch's record, reading it, and cutting it back
to the epochs a resumed run keeps; and the score records of an ablation's finished runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AblationError, PlotError
from ..utils import write_text_replacing
from .layout import ABLATION_RUNS, SCORE_NAME


def append_log(path: Path, record: dict) -> None:
    """Add one epoch's record to the log at ``path`` (one JSON object a line)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, epochs: int) -> None:
    """Keep the log's first ``epochs`` records: a kill after an epoch's log line but before its
    checkpoint makes the resumed run redo that epoch, which must not be logged twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    write_text_replacing(path, "".join(f"{line}\n" for line in kept))


def read_log(log_path) -> list[dict]:
    """The epoch records of a finetune ``log.jsonl``, one per epoch (a resumed epoch's last record).

    A malformed last line (an epoch being written) is ignored; any other bad line is an error.
    """
    log_path = Path(log_path)
    try:
        lines = log_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"cannot read {log_path}: {getattr(exc, 'strerror', None) or exc}") from exc
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    by_epoch: dict[int, dict] = {}
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                break
            raise PlotError(f"{log_path} line {number} is not JSON; is it a flexsurgeon finetune log?") from None
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)
                and all(isinstance(record.get(s), dict) and isinstance(record[s].get(m), dict)
                        for s in ("train", "val") for m in ("loss", "top1"))):
            raise PlotError(f"{log_path} line {number} has no epoch with train/val loss and top1; "
                            "is it a flexsurgeon finetune log?")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise PlotError(f"{log_path} has no finished epochs yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_scores(folder, variants: list[str], seeds: int) -> list[dict]:
    """The ``score.json`` records of the finished runs of the ablation in ``folder``, variant by
    variant and seed by seed."""
    rows = []
    for v in variants:
        for k in range(seeds):
            path = Path(folder) / ABLATION_RUNS / v / f"seed{k}" / SCORE_NAME
            if path.is_file():
                try:
                    rows.append(json.loads(path.read_text()))
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    raise AblationError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return rows
