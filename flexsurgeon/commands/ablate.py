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
- ``results.csv`` (one row per run), ``summary.md``, ``summary.json`` (rewritten after each run),
  ``accuracy.png`` and ``accuracy_by_epoch.png`` (val top-1 after each epoch, mean and range over seeds).

Each variant is compared with the baseline variant (``avg`` unless ``--baseline`` names
another): the mean paired difference with its 95% interval, the paired t-test's p-value, and
that p-value adjusted by Holm's method for the number of variants compared with the baseline.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import AblationError, FlexSurgeonError
from ..plotting.plot import plot_ablation, plot_ablation_by_epoch
from ..runs.layout import (
    ABLATION_REQUEST,
    ABLATION_RESULTS,
    ABLATION_RUNS,
    ACCURACY_BY_EPOCH_NAME,
    ACCURACY_NAME,
    LAST,
    LOG_NAME,
    SCORE_NAME,
    STATE_JSON,
    SUMMARY_JSON,
    SUMMARY_MD,
    is_checkpoint_source,
)
from ..runs.log import read_log, read_scores
from ..training.recipe import Recipe
from ..training.recipe import from_dict as recipe_from_dict
from ..utils import is_hub_name, write_text_replacing
from .stats import MAX_DF, holm, t_quantile, t_two_sided_p

BASES = {"avg": "avg", "token": "token", "flex": "softmax", "flex-linear": "linear", "lse": "lse",
         "simpool": "simpool"}
OPTIONS = ("sac", "dropout")
PAPER_DROPOUT = 0.25
VARIANT_FIELDS = ("pool", "dropout")  # recipe fields each variant sets for its runs
BASELINE = "avg"
MAX_SEEDS = MAX_DF + 1  # the t table's reach: 2 to 31 paired seeds give 1 to 30 degrees of freedom
SIGNIFICANCE = 0.05  # the family-wise level of the Holm column
CSV_FIELDS = ("variant", "seed", "top1", "top5", "loss", "best_top1", "epochs", "seconds")


@dataclass(frozen=True)
class Variant:
    name: str
    pool: str  # a pool kind (layers/kinds.py)
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


def check_baseline(baseline: str, variants: list[str]) -> None:
    """Refuse a baseline that is not one of the variants, in one line naming them."""
    if baseline not in variants:
        raise AblationError(f"--baseline {baseline} is not among the variants ({', '.join(variants)}); "
                            "name one of them")


def summarize(rows: list[dict], variants: list[str], baseline: str = BASELINE) -> list[dict]:
    """Per variant: mean and std of top-1 over seeds, and against the baseline (over the seeds
    both ran) the mean paired difference with its 95% confidence interval, the two-sided
    p-value of the paired t-test (``p``) and that p-value adjusted by Holm's step-down over
    the variants that have one (``p_holm``); None where undefined."""
    by_variant = {v: {int(r["seed"]): float(r["top1"]) for r in rows if r["variant"] == v} for v in variants}
    base = by_variant.get(baseline, {})
    summary = []
    for v in variants:
        scores = by_variant[v]
        values = list(scores.values())
        entry = {"variant": v, "runs": len(values),
                 "mean": statistics.fmean(values) if values else None,
                 "std": statistics.stdev(values) if len(values) > 1 else None,
                 "baseline": baseline, "diff": None, "diff_std": None, "ci_low": None, "ci_high": None,
                 "p": None, "p_holm": None, "paired_runs": 0}
        if v != baseline:
            diffs = [scores[s] - base[s] for s in sorted(scores) if s in base]
            entry["paired_runs"] = len(diffs)
            if diffs:
                entry["diff"] = statistics.fmean(diffs)
            if len(diffs) > 1:
                sd = statistics.stdev(diffs)
                half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
                entry.update(diff_std=sd, ci_low=entry["diff"] - half, ci_high=entry["diff"] + half,
                             p=_paired_p(entry["diff"], sd, len(diffs)))
        summary.append(entry)
    tested = [e for e in summary if e["p"] is not None]
    for entry, adjusted in zip(tested, holm([e["p"] for e in tested])):
        entry["p_holm"] = adjusted
    return summary


def _paired_p(mean: float, sd: float, n: int) -> float:
    """The paired t-test's two-sided p-value; identical differences give 0 (or 1 when all are 0)."""
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)


def markdown_table(summary: list[dict], baseline: str = BASELINE) -> str:
    def num(x, signed=False):
        return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")

    def pval(x):
        return "n/a" if x is None else ("<0.001" if x < 0.001 else f"{x:.3f}")

    lines = [f"| variant | runs | top-1 mean | std | vs {baseline}: mean paired diff | 95% CI | p | Holm |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        if e["variant"] == baseline:
            diff, ci, p, adjusted = "(baseline)", "", "", ""
        else:
            diff = num(e["diff"], signed=True)
            ci = "n/a" if e["ci_low"] is None else f"[{e['ci_low']:+.2f}, {e['ci_high']:+.2f}]"
            p = pval(e["p"])
            adjusted = pval(e["p_holm"]) + (" *" if e["p_holm"] is not None and e["p_holm"] < SIGNIFICANCE else "")
        lines.append(f"| {e['variant']} | {e['runs']} | {num(e['mean'])} | {num(e['std'])} | {diff} | {ci} "
                     f"| {p} | {adjusted} |")
    return "\n".join(lines)


def holm_note(summary: list[dict], baseline: str = BASELINE) -> str:
    """The sentence under the table that says what its p and Holm columns mean."""
    k = sum(e["p_holm"] is not None for e in summary)
    if k == 0:
        return (f"p and Holm: no variant has two seeds paired with {baseline} yet, so no paired t-test; "
                f"run more seeds (--seeds) for them.")
    test = f"p: the two-sided paired t-test of each variant against {baseline} over the seeds both ran; "
    if k == 1:
        return (test + f"Holm: with one comparison so far, the same as p; * (p < {SIGNIFICANCE:g}) marks a "
                f"difference significant at {SIGNIFICANCE:.0%}.")
    return (test + f"Holm: those p-values adjusted by Holm's step-down method for the {k} comparisons with "
            f"{baseline}, so that * (adjusted p < {SIGNIFICANCE:g}) marks a difference significant at "
            f"{SIGNIFICANCE:.0%} with all {k} taken together.")


@dataclass
class AblationResult:
    output: Path
    rows: list[dict]
    summary: list[dict]
    table: str
    plot: Path | None


def run_ablation(model: str, data_spec: str, variants: list[Variant], seeds: int, recipe: Recipe,
                 output: str | Path, *, weights: str | Path = "random", in_chans: int = 3, progress: bool = True,
                 log=print, baseline: str | None = None) -> AblationResult:
    """Fine-tune every (variant, seed) that has not finished yet, then write the comparison
    against ``baseline`` (one of the variants; by default ``avg`` where it is one, else the first)."""
    from ..checkpoints.locks import hold

    if not 1 <= seeds <= MAX_SEEDS:
        raise AblationError(f"--seeds must be 1 to {MAX_SEEDS} (the t table's reach), got {seeds}")
    if is_checkpoint_source(model):  # a converted model has one pool and its heads: no variant could apply
        raise AblationError(f"ablate converts MODEL once per variant, so it takes a model to convert (a timm name, "
                            f"tv:NAME, hf-hub:ORG/NAME or FILE.py:FACTORY); {model} is "
                            f"{'a converted model' if is_hub_name(model) else 'a folder'}")
    names = [v.name for v in variants]
    baseline = baseline if baseline is not None else BASELINE if BASELINE in names else names[0]
    check_baseline(baseline, names)
    set_by_recipe = [f"{k}: {getattr(recipe, k)}" for k in VARIANT_FIELDS if getattr(recipe, k) != getattr(Recipe, k)]
    if set_by_recipe:
        log(f"note: the recipe's {', '.join(set_by_recipe)} are not used: each variant sets its own pool and dropout")
    output = Path(output)
    created = not output.exists()
    with hold(output):
        _check_same_request(output, {"model": model, "data": data_spec, "variants": [v.name for v in variants],
                                     "seeds": seeds, "recipe": recipe.to_dict(), "weights": str(weights),
                                     "in_chans": in_chans})
        try:
            return _run_all(model, data_spec, variants, seeds, recipe, output, weights=weights, in_chans=in_chans,
                            progress=progress, log=log, baseline=baseline)
        except BaseException:
            _undo_if_nothing_ran(output, created)
            raise


def _undo_if_nothing_ran(output: Path, created: bool) -> None:
    """Where the first run stopped before it wrote anything (a model or data set it refused), take
    back what this ablation wrote: a refused command leaves no folder behind."""
    runs = output / ABLATION_RUNS
    if runs.exists() and any(p.is_file() for p in runs.rglob("*")):
        return
    shutil.rmtree(runs, ignore_errors=True)
    (output / ABLATION_REQUEST).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            output.rmdir()  # only when empty


def _run_all(model, data_spec, variants, seeds, recipe, output, *, weights, in_chans, progress, log,
             baseline) -> AblationResult:
    from ..training.run import run

    total = len(variants) * seeds
    for k in range(seeds):  # seed-major, so a stopped ablation has balanced pairs
        for v in variants:
            folder = output / ABLATION_RUNS / v.name / f"seed{k}"
            if (folder / SCORE_NAME).is_file():
                continue
            done = sum((output / ABLATION_RUNS / u.name / f"seed{j}" / SCORE_NAME).is_file()
                       for j in range(seeds) for u in variants)
            log(f"[{done + 1}/{total}] {v.name}, seed {recipe.seed + k}")
            run_recipe = recipe.replace(seed=recipe.seed + k, pool=v.pool, dropout=v.dropout,
                                        sac_weights=recipe.sac_weights if v.sac else None)
            resume = (folder / LAST / STATE_JSON).is_file()
            run(model, data_spec, run_recipe, folder, resume=resume, weights=weights,
                sac_stages=None if v.sac else [], in_chans=in_chans, progress=progress, log=log)
            write_text_replacing(folder / SCORE_NAME, json.dumps(_score(folder, v.name, k)))
            # the report so far, after each run: a long ablation stopped early still has its summary
            write_report(output, [v.name for v in variants], seeds, log=log, baseline=baseline, plot=False)
    return write_report(output, [v.name for v in variants], seeds, log=log, baseline=baseline)


def _check_same_request(output: Path, request: dict) -> None:
    path = output / ABLATION_REQUEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AblationError(f"{path} is not readable JSON ({exc}); remove it or choose another -o") from exc
        with contextlib.suppress(FlexSurgeonError, AttributeError, TypeError):  # unreadable: it differs
            # a recipe recorded by an earlier version lacks the fields added since: they read as their defaults
            previous["recipe"] = recipe_from_dict(previous.get("recipe")).to_dict()
        changed = sorted(k for k in request if previous.get(k) != request[k])
        if changed:
            raise AblationError(f"{output} holds an ablation with other settings ({', '.join(changed)} differ); "
                                "choose another -o to run a different one")
        return
    output.mkdir(parents=True, exist_ok=True)
    write_text_replacing(path, json.dumps(request, indent=2))


def _score(folder: Path, variant: str, k: int) -> dict:
    """The run's final epoch, from its log (the run may have finished before a restart)."""
    records = read_log(folder / LOG_NAME)  # a repeated (resumed) epoch counts once, its last record
    last = records[-1]
    val = last["val"]
    return {"variant": variant, "seed": k, "top1": val["top1"]["main"], "top5": val["top5"]["main"],
            "loss": val["loss"]["main"], "best_top1": last["best_top1"], "epochs": last["epoch"],
            "seconds": sum(r["seconds"] for r in records),
            "top1_by_epoch": [r["val"]["top1"]["main"] for r in records]}


def write_report(output: Path, variants: list[str], seeds: int, log=print,
                 baseline: str | None = None, plot: bool = True) -> AblationResult:
    """Write the comparison of the finished runs; ``baseline`` defaults to ``avg`` where it is a
    variant, else the first variant. ``plot``: also draw the figures (matplotlib)."""
    if baseline is None:
        baseline = BASELINE if BASELINE in variants else variants[0]
    check_baseline(baseline, variants)
    rows = read_scores(output, variants, seeds)
    summary = summarize(rows, variants, baseline)
    table = markdown_table(summary, baseline) + "\n\n" + holm_note(summary, baseline)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    write_text_replacing(output / ABLATION_RESULTS, buffer.getvalue())
    write_text_replacing(output / SUMMARY_MD, table + "\n")
    write_text_replacing(output / SUMMARY_JSON, json.dumps(summary, indent=2))
    figure = None
    if plot:
        try:
            figure = plot_ablation(rows, output / ACCURACY_NAME, baseline=baseline)
            if any(r.get("top1_by_epoch") for r in rows):
                plot_ablation_by_epoch(rows, output / ACCURACY_BY_EPOCH_NAME)
        except FlexSurgeonError as exc:  # matplotlib is optional
            log(f"no {ACCURACY_NAME}: {exc}")
    return AblationResult(output, rows, summary, table, figure)
