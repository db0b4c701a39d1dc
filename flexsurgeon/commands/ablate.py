"""``flexsurgeon ablate``: fine-tune pooling variants with paired seeds and compare them.

A variant is ``BASE[+sac][+dropout]`` with BASE one of ``avg`` (the model's own average
pooling), ``flex`` (softmax FlexPool), ``flex-linear`` (linear FlexPool + its regulariser),
``lse`` and ``simpool`` (timm's LsePlus2d and SimPool2d); ``+sac`` adds SAC heads (the
default taps and loss weights), ``+dropout`` dropout 0.25 on the pooled vector (the paper's).

Every variant runs with the same recipe and, for seed k, the same seed, so seed k of every
variant sees the same batches in the same order: differences are paired. The score of a
run is the main classifier's val top-1 after the last epoch (no checkpoint is picked on the
val split). Layout of OUTPUT:

- ``ablation.json``: what was asked (model, data, variants, seeds, recipe); a repeat of the
  command must ask the same, and then skips every finished (variant, seed);
- ``runs/VARIANT/seedK/``: finetune run folders (an interrupted run is resumed);
- ``results.csv`` (one row per run), ``summary.md``, ``summary.json`` and ``accuracy.png``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import AblationError, FlexSurgeonError
from ..runs.layout import LAST, LOG_NAME
from ..training.recipe import Recipe
from ..utils import write_text_replacing
from .stats import t_quantile

BASES = {"avg": "avg", "flex": "softmax", "flex-linear": "linear", "lse": "lse", "simpool": "simpool"}
OPTIONS = ("sac", "dropout")
PAPER_DROPOUT = 0.25
BASELINE = "avg"
CSV_FIELDS = ("variant", "seed", "top1", "top5", "loss", "best_top1", "epochs", "seconds")


@dataclass(frozen=True)
class Variant:
    name: str
    pool: str  # a pool kind (flexsurgeon.pool_kinds)
    sac: bool
    dropout: float


def parse_variants(text: str) -> list[Variant]:
    """``"avg,flex,flex+sac"`` -> Variants; an unknown base or option is a one-line error."""
    variants = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        base, *options = name.split("+")
        if base not in BASES:
            raise AblationError(f"unknown variant '{name}': the base must be one of {', '.join(BASES)} "
                                f"(then +sac, +dropout), e.g. avg,flex,flex+sac")
        bad = [o for o in options if o not in OPTIONS]
        if bad or len(set(options)) != len(options):
            raise AblationError(f"unknown variant '{name}': options are +sac and +dropout, each at most once")
        variants.append(Variant(name, BASES[base], "sac" in options, PAPER_DROPOUT if "dropout" in options else 0.0))
    names = [v.name for v in variants]
    if not variants:
        raise AblationError("no variants given; e.g. --variants avg,flex,flex+sac")
    if len(set(names)) != len(names):
        raise AblationError(f"a variant is named twice in {text!r}")
    return variants


def summarize(rows: list[dict], variants: list[str], baseline: str = BASELINE) -> list[dict]:
    """Per variant: mean and std of top-1 over seeds, and the mean paired difference to the
    baseline with its 95% confidence interval (seeds both ran; None where undefined)."""
    by_variant = {v: {int(r["seed"]): float(r["top1"]) for r in rows if r["variant"] == v} for v in variants}
    base = by_variant.get(baseline, {})
    summary = []
    for v in variants:
        scores = by_variant[v]
        values = list(scores.values())
        entry = {"variant": v, "runs": len(values),
                 "mean": statistics.fmean(values) if values else None,
                 "std": statistics.stdev(values) if len(values) > 1 else None,
                 "diff": None, "diff_std": None, "ci_low": None, "ci_high": None, "paired_runs": 0}
        if v != baseline:
            diffs = [scores[s] - base[s] for s in sorted(scores) if s in base]
            entry["paired_runs"] = len(diffs)
            if diffs:
                entry["diff"] = statistics.fmean(diffs)
            if len(diffs) > 1:
                sd = statistics.stdev(diffs)
                half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
                entry.update(diff_std=sd, ci_low=entry["diff"] - half, ci_high=entry["diff"] + half)
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict], baseline: str = BASELINE) -> str:
    def num(x, signed=False):
        return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")

    lines = [f"| variant | runs | top-1 mean | std | vs {baseline}: mean paired diff | 95% CI |",
             "|---|---|---|---|---|---|"]
    for e in summary:
        if e["variant"] == baseline:
            diff, ci = "(baseline)", ""
        else:
            diff = num(e["diff"], signed=True)
            ci = "n/a" if e["ci_low"] is None else f"[{e['ci_low']:+.2f}, {e['ci_high']:+.2f}]"
        lines.append(f"| {e['variant']} | {e['runs']} | {num(e['mean'])} | {num(e['std'])} | {diff} | {ci} |")
    return "\n".join(lines)


@dataclass
class AblationResult:
    output: Path
    rows: list[dict]
    summary: list[dict]
    table: str
    plot: Path | None


def run_ablation(model: str, data_spec: str, variants: list[Variant], seeds: int, recipe: Recipe,
                 output: str | Path, *, weights: str | Path = "random", in_chans: int = 3, progress: bool = True,
                 log=print) -> AblationResult:
    """Fine-tune every (variant, seed) that has not finished yet, then write the comparison."""
    from ..checkpoints.locks import hold
    from ..runs.layout import STATE_JSON
    from ..training.loop import run

    if seeds < 1:
        raise AblationError(f"--seeds must be at least 1, got {seeds}")
    output = Path(output)
    with hold(output):
        _check_same_request(output, {"model": model, "data": data_spec, "variants": [v.name for v in variants],
                                     "seeds": seeds, "recipe": recipe.to_dict(), "weights": str(weights),
                                     "in_chans": in_chans})
        total = len(variants) * seeds
        for k in range(seeds):  # seed-major, so a stopped ablation has balanced pairs
            for v in variants:
                folder = output / "runs" / v.name / f"seed{k}"
                if (folder / "score.json").is_file():
                    continue
                done = sum((output / "runs" / u.name / f"seed{j}" / "score.json").is_file()
                           for j in range(seeds) for u in variants)
                log(f"[{done + 1}/{total}] {v.name}, seed {recipe.seed + k}")
                run_recipe = recipe.replace(seed=recipe.seed + k, pool=v.pool, dropout=v.dropout,
                                            sac_weights=recipe.sac_weights if v.sac else None)
                resume = (folder / LAST / STATE_JSON).is_file()
                run(model, data_spec, run_recipe, folder, resume=resume, weights=weights,
                    sac_stages=None if v.sac else [], in_chans=in_chans, progress=progress, log=log)
                write_text_replacing(folder / "score.json", json.dumps(_score(folder, v.name, k)))
        return write_report(output, [v.name for v in variants], seeds, log=log)


def _check_same_request(output: Path, request: dict) -> None:
    path = output / "ablation.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AblationError(f"{path} is not readable JSON ({exc}); remove it or choose another -o") from exc
        changed = sorted(k for k in request if previous.get(k) != request[k])
        if changed:
            raise AblationError(f"{output} holds an ablation with other settings ({', '.join(changed)} differ); "
                                "choose another -o to run a different one")
        return
    output.mkdir(parents=True, exist_ok=True)
    write_text_replacing(path, json.dumps(request, indent=2))


def _score(folder: Path, variant: str, k: int) -> dict:
    """The run's final epoch, from its log (the run may have finished before a restart)."""
    by_epoch = {}  # a kill between the log write and the checkpoint repeats an epoch on resume: keep the last
    for line in (folder / LOG_NAME).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
    records = [by_epoch[e] for e in sorted(by_epoch)]
    last = records[-1]
    val = last["val"]
    return {"variant": variant, "seed": k, "top1": val["top1"]["main"], "top5": val["top5"]["main"],
            "loss": val["loss"]["main"], "best_top1": last["best_top1"], "epochs": last["epoch"],
            "seconds": sum(r["seconds"] for r in records)}


def write_report(output: Path, variants: list[str], seeds: int, log=print) -> AblationResult:
    rows = []
    for v in variants:
        for k in range(seeds):
            path = output / "runs" / v / f"seed{k}" / "score.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
    baseline = BASELINE if BASELINE in variants else variants[0]
    summary = summarize(rows, variants, baseline)
    table = markdown_table(summary, baseline)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    write_text_replacing(output / "results.csv", buffer.getvalue())
    write_text_replacing(output / "summary.md", table + "\n")
    write_text_replacing(output / "summary.json", json.dumps(summary, indent=2))
    plot = None
    try:
        from ..plotting.plot import plot_ablation

        plot = plot_ablation(rows, output / "accuracy.png", baseline=baseline)
    except FlexSurgeonError as exc:  # matplotlib is optional
        log(f"no accuracy.png: {exc}")
    return AblationResult(output, rows, summary, table, plot)
