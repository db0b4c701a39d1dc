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
from flexsurgeon.commands.ablate import holm_note, parse_variants, summarize
from flexsurgeon.commands.stats import holm, t_quantile, t_two_sided_p
from flexsurgeon.errors import AblationError

ARGS = ["test_resnet", "--random-init", "--img-size", "64", "--data", "synthetic:classes=3,train=32,val=16",
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


@pytest.mark.parametrize("df, expected", [(3, 3.182), (5, 2.571), (6, 2.447), (10, 2.228), (15, 2.131),
                                          (20, 2.086), (25, 2.060), (29, 2.045)])
def test_t_quantile_matches_published_values(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)  # 3 decimals, rounded


@pytest.mark.parametrize("p, df", [(0.975, 0), (0.975, 31), (0.95, 4), (0.975, 2.5)])
def test_t_quantile_outside_the_table_is_a_clear_error(p, df):
    with pytest.raises(ValueError, match="t_quantile"):
        t_quantile(p, df)


@pytest.mark.parametrize("t, df, expected", [
    (2.776, 4, 0.05), (2.228, 10, 0.05), (-2.228, 10, 0.05), (12.706, 1, 0.05), (2.042, 30, 0.05),
    (1.0, 1, 0.5),  # Cauchy: P(|T| > 1) = 1/2
    (2.0, 2, 1 - 2 / math.sqrt(6)),  # df 2: p = 1 - |t| / sqrt(2 + t^2)
    (3.0, 7, 0.019942), (0.1, 30, 0.921010), (0.0, 5, 1.0), (math.inf, 3, 0.0)])
def test_two_sided_p_of_the_t_statistic_matches_known_values(t, df, expected):
    assert t_two_sided_p(t, df) == pytest.approx(expected, abs=2e-4)


def test_the_p_value_at_each_tabled_quantile_is_five_percent():
    assert all(t_two_sided_p(t_quantile(0.975, df), df) == pytest.approx(0.05, abs=2e-5) for df in range(1, 31))


def test_holm_multiplies_the_i_th_smallest_p_by_k_minus_i_plus_one_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9]) and holm([0.6, 0.7]) == [1.0, 1.0] and holm([]) == []


def test_summary_against_another_baseline_with_holm_adjusted_p_values():
    rows = [{"variant": v, "seed": s, "top1": t} for v, s, t in [
        ("avg", 0, 80.0), ("avg", 1, 82.0), ("avg", 2, 90.0),
        ("flex", 0, 81.0), ("flex", 1, 83.5), ("flex", 2, 91.2),
        ("lse", 0, 79.0), ("lse", 1, 84.0), ("lse", 2, 89.5)]]
    avg, flex, lse = summarize(rows, ["avg", "flex", "lse"], baseline="flex")
    assert flex["diff"] is None and flex["p"] is None and flex["baseline"] == "flex"
    diffs = [-1.0, -1.5, -1.2]
    assert avg["diff"] == pytest.approx(statistics.fmean(diffs))
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    assert avg["p"] == pytest.approx(t_two_sided_p(t, 2))
    assert [avg["p_holm"], lse["p_holm"]] == pytest.approx(holm([avg["p"], lse["p"]]))
    assert avg["p_holm"] == pytest.approx(min(1.0, 2 * min(avg["p"], lse["p"])))  # the smaller p, times k = 2


def test_the_holm_note_counts_the_comparisons_that_have_a_p_value():
    rows = [{"variant": v, "seed": s, "top1": t} for v, s, t in [
        ("avg", 0, 80.0), ("avg", 1, 82.0), ("flex", 0, 81.0), ("flex", 1, 83.5), ("lse", 0, 79.0)]]
    notes = [holm_note(summarize([r for r in rows if r["seed"] < seeds], ["avg", "flex", "lse"])) for seeds in (1, 2)]
    assert notes[0].startswith("p and Holm: no variant has two seeds paired with avg yet")
    assert notes[1].endswith("Holm: with one comparison so far, the same as p; * (p < 0.05) marks a difference "
                             "significant at 5%.")  # lse has one seed: no p-value, not counted
    rows += [{"variant": "lse", "seed": 1, "top1": 84.0}]
    both = holm_note(summarize(rows, ["avg", "flex", "lse"]))
    assert "Holm's step-down method for the 2 comparisons with avg" in both


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
    for r in rows:  # the score is the final epoch's val top-1, as the run's log has it, with every epoch's
        folder = out / "runs" / r["variant"] / f"seed{r['seed']}"
        log = [json.loads(line) for line in (folder / "log.jsonl").open()]
        assert float(r["top1"]) == pytest.approx(log[-1]["val"]["top1"]["main"])
        by_epoch = json.loads((folder / "score.json").read_text())["top1_by_epoch"]
        assert by_epoch == [e["val"]["top1"]["main"] for e in log] and len(by_epoch) == int(r["epochs"])
    assert (out / "accuracy.png").is_file() and (out / "accuracy_by_epoch.png").is_file()
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
    drawn = runner.invoke(main, ["plot", str(out)])  # plot redraws both figures ablate drew
    assert drawn.exit_code == 0, drawn.output
    assert drawn.output.split() == ["wrote", str(out / "plots" / "accuracy.png"),
                                    "wrote", str(out / "plots" / "accuracy_by_epoch.png")]

    # repeating the command runs nothing; a lost score re-runs (resumes) only that run
    score = out / "runs" / "avg" / "seed1" / "score.json"
    kept = json.loads(score.read_text())
    score.unlink()
    again = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac", "--seeds", "2", "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("] avg, seed") == 1 and "flex+sac, seed" not in again.output
    assert json.loads(score.read_text())["top1"] == kept["top1"]

    # an ablation recorded before a recipe field existed goes on: the field reads as its default
    request = json.loads((out / "ablation.json").read_text())
    del request["recipe"]["ema_warmup"]
    (out / "ablation.json").write_text(json.dumps(request))
    older = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac", "--seeds", "2", "-o", str(out)])
    assert older.exit_code == 0 and ", seed " not in older.output, older.output  # nothing re-runs
    changed = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac", "--seeds", "2", "--set", "lr=0.5",
                                   "-o", str(out)])
    assert changed.exit_code == 1 and "other settings (recipe differ)" in changed.output
    other = runner.invoke(main, ["ablate", *ARGS, "--variants", "avg,flex", "--seeds", "2", "-o", str(out)])
    assert other.exit_code == 1 and "other settings (variants differ)" in other.output


def test_unknown_variant_is_one_line_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["ablate", *ARGS, "--variants", "avg,flexx", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "unknown variant 'flexx'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a").exists()


@pytest.mark.parametrize("field", ["pool=linear", "dropout=0.5"])
def test_a_pool_or_dropout_set_for_every_run_is_refused_as_the_variants_set_them(field, tmp_path):
    result = CliRunner().invoke(main, ["ablate", *ARGS, "--variants", "avg,flex", "--set", field,
                                       "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"--set {field.split('=')[0]}: each variant sets its own pool and dropout" in result.output
    assert not (tmp_path / "a").exists()


def test_a_recipe_files_pool_and_dropout_are_named_as_not_used(tmp_path):
    # the shipped paper recipe sets pool: linear and dropout: 0.25; in an ablation the variants decide
    out = tmp_path / "abl"
    result = CliRunner().invoke(main, ["ablate", *ARGS[:-6], "--recipe", "paper", "--epochs", "1", "--batch-size",
                                       "16", "--variants", "avg", "--seeds", "1", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: the recipe's pool: linear, dropout: 0.25 are not used" in result.output
    assert json.loads((out / "runs" / "avg" / "seed0" / "last" / "config.json").read_text())[
        "model_args"]["plan"]["pool"] == "avg"


def test_baseline_flex_compares_against_flex_with_a_holm_column(tmp_path):
    out = tmp_path / "abl"
    result = CliRunner().invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac,lse", "--seeds", "2",
                                       "--baseline", "flex+sac", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["variant"], int(r["seed"])): float(r["top1"]) for r in csv.DictReader((out / "results.csv").open())}
    summary = {e["variant"]: e for e in json.loads((out / "summary.json").read_text())}
    base = summary["flex+sac"]
    assert base["diff"] is None and base["p"] is None and base["baseline"] == "flex+sac"
    for v in ("avg", "lse"):  # paired differences against flex+sac, not against avg
        diffs = [rows[v, k] - rows["flex+sac", k] for k in (0, 1)]
        assert summary[v]["diff"] == pytest.approx(statistics.fmean(diffs)) and summary[v]["paired_runs"] == 2
        assert summary[v]["baseline"] == "flex+sac"
    tested = [summary[v] for v in ("avg", "lse")]
    assert [e["p_holm"] for e in tested] == pytest.approx(holm([e["p"] for e in tested]))
    lines = (out / "summary.md").read_text().splitlines()
    assert "vs flex+sac: mean paired diff" in lines[0] and lines[0].endswith("| p | Holm |")
    table = {line.split("|")[1].strip(): line for line in lines[2:5]}
    assert "(baseline)" in table["flex+sac"] and "(baseline)" not in table["avg"]
    assert f"| {summary['avg']['diff']:+.2f} |" in table["avg"]
    assert "Holm's step-down method for the 2 comparisons with flex+sac" in lines[-1]
    assert lines[-1] in result.output


def test_a_baseline_not_among_the_variants_is_one_line_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["ablate", *ARGS, "--variants", "avg,flex+sac", "--baseline", "flex",
                                       "-o", str(tmp_path / "a")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: --baseline flex is not among the variants (avg, flex+sac); name one of them"]
    assert not (tmp_path / "a").exists()


def test_without_avg_among_the_variants_the_first_is_the_baseline(tmp_path):
    """benchmarks/paper_resnet20_gpu.sh runs one variant per process: no --baseline, no avg."""
    out = tmp_path / "abl"
    result = CliRunner().invoke(main, ["ablate", *ARGS, "--variants", "flex", "--seeds", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())[0]["baseline"] == "flex"


@pytest.mark.parametrize("model, data, message", [
    ("resnet5O", "synthetic:classes=2", "unknown model 'resnet5O'"),
    ("test_resnet", "/no/such/folder", "no such file or folder"),
])
def test_a_model_or_data_set_the_first_run_refuses_leaves_no_ablation_folder(tmp_path, model, data, message):
    out = tmp_path / "abl"
    result = CliRunner().invoke(main, ["ablate", model, "--random-init", "--data", data, "--variants", "avg,flex",
                                       "--recipe", "smoke", "-o", str(out)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_converted_model_folder_is_refused_before_any_run(tmp_path):
    """Each variant is its own conversion; a folder (converted or not) cannot be one, and it is
    said at once, not as a refusal of an option the user never gave."""
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "config.json").write_text("{}")
    out = tmp_path / "abl"
    result = CliRunner().invoke(main, ["ablate", str(tmp_path / "converted"), "--data", "synthetic:classes=3",
                                       "--variants", "avg,flex", "--seeds", "1", "-o", str(out)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: ablate converts MODEL once per variant, so it takes a model to convert")
    assert result.output.rstrip().endswith(f"{tmp_path / 'converted'} is a folder") and not out.exists()
