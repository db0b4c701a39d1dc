"""`flexsurgeon ablate`: variants, paired seeds, statistics, resumable runs and the report files."""
import csv
import json
import math
import re
import statistics

import pytest
import yaml
from click.testing import CliRunner

from flexsurgeon.cli.main import main
from flexsurgeon.commands.ablate import parse_variants, summarize
from flexsurgeon.commands.stats import t_quantile
from flexsurgeon.errors import AblationError

ARGS = ["resnet10t", "--random-init", "--img-size", "64", "--data", "synthetic:classes=3,train=32,val=16",
        "--recipe", "smoke", "--epochs", "1", "--batch-size", "16"]


def test_variants_parse_into_pool_kinds_heads_and_dropout():
    avg, flex, lin = parse_variants("avg, flex+sac, flex-linear+dropout+sac")
    assert (avg.pool, avg.sac, avg.dropout) == ("avg", False, 0.0)
    assert (flex.pool, flex.sac, flex.dropout) == ("softmax", True, 0.0)
    assert (lin.pool, lin.sac, lin.dropout) == ("linear", True, 0.25)
    for bad, message in [("avg,max", "unknown variant 'max'"), ("flex+sac+sac", "each at most once"),
                         ("flex+bn", "unknown variant 'flex+bn'"), ("avg,avg", "named twice"), (",", "no variants")]:
        with pytest.raises(AblationError, match=re.escape(message)):
            parse_variants(bad)


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_summary_pairs_seeds_against_the_baseline():
    rows = [{"variant": v, "seed": s, "top1": t} for v, s, t in [
        ("avg", 0, 80.0), ("avg", 1, 82.0), ("avg", 2, 90.0),
        ("flex", 0, 81.0), ("flex", 1, 83.5), ("flex", 2, 91.2),
        ("lse", 0, 70.0)]]
    avg, flex, lse = summarize(rows, ["avg", "flex", "lse"])
    assert avg["mean"] == pytest.approx(84.0) and avg["diff"] is None
    diffs = [1.0, 1.5, 1.2]  # paired: the spread between seeds (80..90) cancels
    half = t_quantile(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert flex["diff"] == pytest.approx(statistics.fmean(diffs))
    assert (flex["ci_low"], flex["ci_high"]) == pytest.approx((flex["diff"] - half, flex["diff"] + half))
    assert flex["ci_low"] > 0  # an unpaired comparison of these means could not tell
    assert lse["runs"] == 1 and lse["std"] is None and lse["diff"] == -10.0 and lse["ci_low"] is None


def test_ablation_runs_pairs_reports_and_resumes(tmp_path):
    out = tmp_path / "abl"
    runner = CliRunner()
    first = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac", "--seeds", "2", "-o", str(out)])
    assert first.exit_code == 0, first.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("avg", "0"), ("avg", "1"), ("flex+sac", "0"),
                                                         ("flex+sac", "1")]
    for r in rows:  # the score is the final epoch's val top-1, as the run's log has it
        log = [json.loads(line) for line in (out / "runs" / r["variant"] / f"seed{r['seed']}" / "log.jsonl").open()]
        assert float(r["top1"]) == pytest.approx(log[-1]["val"]["top1"]["main"])
    # paired: seed k of both variants ran with the same seed, and the variant decided pool and heads
    for k in (0, 1):
        recipes = {v: yaml.safe_load((out / "runs" / v / f"seed{k}" / "recipe.yaml").read_text())
                   for v in ("avg", "flex+sac")}
        assert recipes["avg"]["seed"] == recipes["flex+sac"]["seed"] == k
        assert (recipes["avg"]["pool"], recipes["flex+sac"]["pool"]) == ("avg", "softmax")
    sac_log = json.loads((out / "runs" / "flex+sac" / "seed0" / "log.jsonl").read_text().splitlines()[0])
    assert len(sac_log["val"]["top1"]) == 3  # two SAC heads and main
    table = (out / "summary.md").read_text()
    assert "| avg | 2 |" in table and "| flex+sac | 2 |" in table and "95% CI" in table
    assert "| flex+sac | 2 |" in first.output

    # repeating the command runs nothing; a lost score re-runs (resumes) only that run
    score = out / "runs" / "avg" / "seed1" / "score.json"
    kept = json.loads(score.read_text())
    score.unlink()
    again = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac", "--seeds", "2", "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("] avg, seed") == 1 and "flex+sac, seed" not in again.output
    assert json.loads(score.read_text())["top1"] == kept["top1"]

    other = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex", "--seeds", "2", "-o", str(out)])
    assert other.exit_code == 1 and "other settings (variants differ)" in other.output


def test_unknown_variant_is_one_line_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["ablate", *ARGS, "--variants", "avg,flexx", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "unknown variant 'flexx'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a").exists()
