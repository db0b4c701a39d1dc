"""The ``flexsurgeon`` command line: parse, call the library, print.

Heavy imports happen inside commands so ``--help`` answers at once. Every
``FlexSurgeonError`` becomes one line on stderr and exit code 1 (``--debug`` shows the
traceback instead).
"""
from __future__ import annotations

import json
import sys

import click

from ..commands.ablate import (
    BASELINE,
    MAX_SEEDS,
    VARIANT_FIELDS,
    check_baseline,
    parse_variants,
    run_ablation,
)
from ..errors import AblationError
from ..layers.kinds import POOL_KINDS
from ..runs.layout import ABLATION_RESULTS, ACCURACY_NAME, SUMMARY_MD
from ..utils import first_line
from .options import (
    friendly_errors,
    model_code_option,
    size_callback,
    stages_callback,
    surgery_kwargs,
    surgery_options,
    weight_options,
    weights_callback,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.version_option(package_name="flexsurgeon")
def main(debug: bool) -> None:
    """Replace a model's global pooling (CNNs, vision transformers) with FlexPool and attach SAC heads."""


@main.command()
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Folder to write config.json and model.safetensors to.")
@surgery_options
@weight_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for the new SAC heads' initial weights (and the model's, with --random-init).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@friendly_errors
def convert(model, output, weights, weights_file, seed, force, **params):
    """Convert MODEL (a timm name, tv:NAME for torchvision, or FILE.py:FACTORY for your own
    model) and save it to OUTPUT."""
    from pathlib import Path

    import torch

    from ..checkpoints.io import save
    from ..checkpoints.locks import hold
    from ..errors import CheckpointError, FlexSurgeonError
    from ..surgery.convert import convert as convert_model
    from ..surgery.costs import measure_rebuilt
    from .report import converted_line, cost_lines

    with hold(output):  # refuse before spending time on the model
        if Path(output).exists() and not force:
            raise CheckpointError(f"output folder {output} already exists; pass --force to replace it")
        source = weights_file if weights_file else weights
        torch.manual_seed(seed)  # the same command writes the same weights
        converted = convert_model(model, weights=source, progress=True, **surgery_kwargs(params))
        try:  # measured before the save: nothing after it can fail the command
            costs = cost_lines(measure_rebuilt(model, converted))
        except (FlexSurgeonError, RuntimeError, ValueError) as exc:
            costs = [f"warning: costs not measured: {first_line(exc)}"]
        path = save(converted, output, force=force)
    try:  # the folder is complete: an interrupt now must not read as a failed conversion
        click.echo(converted_line(converted.flexsurgeon_plan))
        click.echo("\n".join(costs))
        click.echo(f"saved {path}/  (load: flexsurgeon.load('{path}') or timm.create_model('local-dir:{path}', "
                   "pretrained=True) after import flexsurgeon)")
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted after the save: {path} is complete", err=True)
        sys.exit(130)


@main.command()
@click.argument("model")
@surgery_options
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@friendly_errors
def inspect(model, as_json, **params):
    """Show MODEL's global pools and stages, and what convert would do (MODEL as for convert)."""
    from ..surgery.convert import inspect as inspect_model
    from .report import inspection_report

    found = inspect_model(model, weights="random", **surgery_kwargs(params))
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2))
    else:
        click.echo(inspection_report(model, found))
    if found.plan is None:
        sys.exit(1)


@main.command()
@click.argument("source")
@click.option("--data", "data_spec", required=True, metavar="PATH",
              help="An image folder (train/ + val/, or class folders split by --val-split), a folder of IDX "
                   "files (Fashion-MNIST), synthetic[:k=v,...], or a timm dataset name.")
@click.option("--recipe", default="quick", show_default=True, metavar="NAME|FILE",
              help="A shipped recipe (smoke, quick, paper, probe) or a YAML file.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), help="Run folder [default: runs/NAME].")
@click.option("--epochs", type=click.IntRange(min=1), help="Recipe override.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Recipe override.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Recipe override.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Recipe override [recipe default: auto].")
@click.option("--workers", type=click.IntRange(min=0), help="Recipe override: data loader workers.")
@click.option("--seed", type=int, help="Recipe override.")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), help="Recipe override.")
@click.option("--img-size", callback=size_callback, metavar="N|HxW",
              help="Recipe override (when SOURCE is a model name).")
@click.option("--pool", type=click.Choice(POOL_KINDS), help="Recipe override (when converting).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="Recipe override (when converting).")
@click.option("--sac-weights", callback=weights_callback, metavar="LIST",
              help="Recipe override: loss weights, heads then main.")
@click.option("--keep-sac/--drop-sac", default=None,
              help="Keep SAC heads in best/ (last/ always keeps them) [recipe default: drop].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe field (repeatable).")
@click.option("--sac-stages", callback=stages_callback, metavar="LIST", help="SAC taps when converting a model name.")
@click.option("--in-chans", type=click.IntRange(min=1), default=3, show_default=True,
              help="Input channels when converting a timm model name.")
@click.option("--replace-gating", is_flag=True, help="Also replace gating pools when converting.")
@weight_options
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last/ checkpoint.")
@click.option("--num-classes", type=click.IntRange(min=1),
              help="Re-initialise a converted folder's classifier and SAC heads for N classes (the data's).")
@model_code_option
@friendly_errors
def finetune(source, data_spec, recipe, output, sets, sac_stages, in_chans, replace_gating, weights, weights_file,
             resume, num_classes, model_code, **overrides):
    """Fine-tune SOURCE (a folder written by convert, a converted model on the Hub as
    hf-hub:ORG/NAME, or a model to convert first: a timm name, tv:NAME or FILE.py:FACTORY)."""
    from pathlib import Path

    from ..training.recipe import load_recipe, parse_override, with_overrides
    from ..training.run import run

    changes = {k: v for k, v in overrides.items() if v is not None}
    if "sac_weights" in changes:
        changes["sac_weights"] = list(changes["sac_weights"])
    changes.update(parse_override(s) for s in sets)
    resolved = with_overrides(load_recipe(recipe), changes)
    output = output or str(Path("runs") / Path(source.replace(":", "_")).name)
    try:
        result = run(source, data_spec, resolved, output, resume=resume, overrides=changes,
                     weights=weights_file or weights, sac_stages=sac_stages, in_chans=in_chans,
                     replace_gating=replace_gating, model_code=model_code, num_classes=num_classes,
                     log=click.echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: run the same command with --resume to continue from the last finished "
                   f"epoch in {output}/last", err=True)
        sys.exit(130)
    if result.main:
        click.echo(f"done: best val top-1 {result.best_top1:.2f} at epoch {result.best_epoch}; "
                   f"checkpoints in {result.output}/best and {result.output}/last")


@main.command()
@click.argument("path", metavar="DIR")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False),
              help="Folder for the PNGs [default: DIR/plots; required for hf-hub:].")
@click.option("--top", type=click.IntRange(min=1),
              help="Channels per weight map: those with the largest spread (max - min of the weights) [default: 8].")
@model_code_option
@friendly_errors
def plot(path, output, top, model_code):
    """Write PNGs for DIR: FlexPool weight maps (a model folder), training curves (a finetune run,
    plus its best/ model's weight maps) or the accuracy plots (an ablation folder with results.csv:
    accuracy.png, and accuracy_by_epoch.png from its runs' records).
    A converted model on the Hub, hf-hub:ORG/NAME, gives its weight maps.
    Needs matplotlib: pip install 'flexsurgeon[plot]'."""
    from ..plotting.plot import plot_folder

    for written in plot_folder(path, output, top=top, model_code=model_code):
        click.echo(f"wrote {written}")


@main.command(name="eval")
@click.argument("source", metavar="DIR|MODEL")
@click.option("--data", "data_spec", required=True, metavar="PATH",
              help="Any --data form finetune takes; its validation split is scored.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader workers.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Val fraction, for data without a val part of its own [default: 0.1].")
@click.option("--seed", type=int, help="Seed of that val split [default: 0].")
@click.option("--num-classes", type=click.IntRange(min=1), help="Classes of a model given by name.")
@click.option("--img-size", callback=size_callback, metavar="N|HxW", help="Input size for a model given by name.")
@click.option("--in-chans", type=click.IntRange(min=1), default=3, show_default=True,
              help="Input channels for a model given by name.")
@weight_options
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@model_code_option
@friendly_errors
def eval_command(source, data_spec, batch_size, workers, device, val_split, seed, num_classes, img_size, in_chans,
                 weights, weights_file, as_json, model_code):
    """Top-1, top-5 and loss of the main classifier and every SAC head on the val split.

    DIR is a folder written by convert or finetune (a run folder means its best/ checkpoint)
    or hf-hub:ORG/NAME; MODEL is a timm name, tv:NAME or FILE.py:FACTORY, for comparison with the unconverted model."""
    from ..commands.evaluate import evaluate_source
    from ..training.metrics import one_class_note
    from .report import table

    scores = evaluate_source(source, data_spec, batch_size=batch_size, workers=workers, device=device,
                             val_split=val_split, seed=seed, weights=weights_file or weights,
                             num_classes=num_classes, img_size=img_size, in_chans=in_chans, model_code=model_code)
    if as_json:
        click.echo(json.dumps(scores, indent=2))
        return
    click.echo(f"{scores['model']} on {scores['data']}: {scores['count']} val images")
    if scores["label_names"]:
        click.echo(f"classes: {', '.join(scores['label_names'])}")
    rows = [("head", "top-1", "top-5", "loss")]
    rows += [(h, f"{s['top1']:.2f}", f"{s['top5']:.2f}", f"{s['loss']:.4f}") for h, s in scores["heads"].items()]
    click.echo("\n".join(table(rows)))
    if scores["one_class"] is not None:
        click.echo(f"note: {one_class_note(scores)}", err=True)


@main.command(name="export")
@click.argument("directory", metavar="DIR", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "safetensors"]),
              help="onnx: one .onnx file; safetensors: a convert-style folder for inference.")
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="The .onnx file, or the folder, to write.")
@click.option("--img-size", callback=size_callback, metavar="N|HxW",
              help="ONNX input size; FlexPool weights are fixed for it [default: the model's input size].")
@click.option("--opset", type=click.IntRange(min=7), help="ONNX opset [default: torch's].")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@model_code_option
@friendly_errors
def export_command(directory, fmt, output, img_size, opset, force, model_code):
    """Export the model in DIR for inference, without SAC heads.

    DIR is a folder written by convert or finetune (a run folder means its best/ checkpoint), or a
    converted model on the Hub as hf-hub:ORG/NAME.
    onnx takes a fixed input size and any batch size (needs pip install 'flexsurgeon[export]');
    safetensors loads with flexsurgeon.load and timm's local-dir:."""
    from pathlib import Path

    from ..checkpoints.io import load_folder
    from ..commands.export import export_inference_folder, export_onnx
    from ..errors import ExportError
    from ..runs.layout import checkpoint_source

    if fmt == "safetensors" and (img_size or opset):
        raise click.UsageError("--img-size and --opset apply to --format onnx only")
    if Path(output).exists() and not force:  # refuse before spending time on the model
        raise ExportError(f"output {output} already exists; pass --force to replace it")
    folder = checkpoint_source(directory)
    model = load_folder(folder, model_code)
    if fmt == "onnx":
        path = export_onnx(model, output, img_size=img_size, opset=opset, force=force)
        size = img_size or model.flexsurgeon_plan.img_size
        click.echo(f"exported {folder} to {path} (ONNX, input 'input' Bx{model.flexsurgeon_plan.in_chans}x"
                   f"{size[0]}x{size[1]}, SAC heads dropped)")
    else:
        path = export_inference_folder(model, output, force=force)
        click.echo(f"exported {folder} to {path}/ without SAC heads (load: flexsurgeon.load('{path}') or "
                   f"timm.create_model('local-dir:{path}', pretrained=True) after import flexsurgeon)")


@main.command()
@click.argument("directory", metavar="DIR", type=click.Path())
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the repository as private (when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created when missing) [default: main].")
@click.option("--dry-run", "dry_run", type=click.Path(file_okay=False), metavar="OUT",
              help="Write the files that would be uploaded to OUT, and upload nothing.")
@click.option("--force", is_flag=True, help="Replace OUT of --dry-run if it exists.")
@friendly_errors
def push(directory, repo_id, private, revision, dry_run, force):
    """Upload DIR (a convert, finetune or export folder) to the Hugging Face Hub as REPO_ID
    (ORG/NAME), with a model card, in one commit.

    Loads afterwards with timm.create_model('hf-hub:REPO_ID', pretrained=True) after
    import flexsurgeon. Needs huggingface_hub (pip install 'flexsurgeon[hub]') and a login
    (hf auth login, or HF_TOKEN)."""
    from ..commands.publish import push as push_folder

    if dry_run is not None and (private or revision):  # refused, never ignored
        raise click.UsageError("--private and --revision apply to an upload; --dry-run uploads nothing")
    if dry_run is None and force:
        raise click.UsageError("--force replaces the OUT of --dry-run; an upload replaces nothing")
    result = push_folder(directory, repo_id, private=private, revision=revision, dry_run=dry_run, force=force)
    where = f"wrote to {result.output}/" if result.output else f"pushed to {repo_id}: {result.url}"
    click.echo(f"{where} ({', '.join(result.files)}); commit message: {result.commit_message!r}")


@main.command()
@click.argument("model")
@click.option("--data", "data_spec", required=True, metavar="PATH", help="Any --data form finetune takes.")
@click.option("--variants", default="avg,flex,flex+sac", show_default=True, metavar="LIST",
              help="Comma-separated: avg, flex, flex-linear, lse, simpool, each optionally +sac and/or +dropout.")
@click.option("--seeds", type=click.IntRange(min=1, max=MAX_SEEDS), default=3, show_default=True,
              help="Runs per variant; seed k of every variant sees the same batches.")
@click.option("--baseline", metavar="VARIANT",
              help=f"The variant every other one is compared with (paired differences, p-values); one of "
                   f"--variants [default: {BASELINE}, else the first variant].")
@click.option("--recipe", default="smoke", show_default=True, metavar="NAME|FILE", help="Recipe for every run.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False),
              help="Ablation folder [default: ablations/MODEL].")
@click.option("--epochs", type=click.IntRange(min=1), help="Recipe override.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Recipe override.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Recipe override.")
@click.option("--img-size", callback=size_callback, metavar="N|HxW", help="Recipe override.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Recipe override.")
@click.option("--workers", type=click.IntRange(min=0), help="Recipe override: data loader workers.")
@click.option("--seed", type=int, help="Recipe override: the first seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe field (repeatable).")
@click.option("--in-chans", type=click.IntRange(min=1), default=3, show_default=True,
              help="Input channels (timm models; 1 for gray data).")
@weight_options
@friendly_errors
def ablate(model, data_spec, variants, seeds, baseline, recipe, output, sets, in_chans, weights, weights_file,
           **overrides):
    """Fine-tune pooling variants of MODEL (a timm name, tv:NAME or FILE.py:FACTORY) with paired
    seeds and compare each with the baseline variant.

    Writes summary.md (a Markdown table: paired differences, 95% intervals, p-values and their
    Holm adjustment), summary.json, results.csv, accuracy.png and accuracy_by_epoch.png (with
    matplotlib) to the ablation folder, the report after each run; repeating the command skips
    finished runs."""
    from pathlib import Path

    from ..training.recipe import load_recipe, parse_override, with_overrides

    parsed = parse_variants(variants)
    if baseline is not None:
        check_baseline(baseline, [v.name for v in parsed])
    changes = {k: v for k, v in overrides.items() if v is not None}
    changes.update(parse_override(s) for s in sets)
    chosen = [k for k in VARIANT_FIELDS if k in changes]
    if chosen:  # refused, never ignored
        raise AblationError(f"--set {chosen[0]}: each variant sets its own pool and dropout (--variants)")
    resolved = with_overrides(load_recipe(recipe), changes)
    output = output or str(Path("ablations") / Path(model.replace(":", "_")).name)
    result = run_ablation(model, data_spec, parsed, seeds, resolved, output, weights=weights_file or weights,
                          in_chans=in_chans, log=click.echo, baseline=baseline)
    click.echo(result.table)
    written = [ABLATION_RESULTS, SUMMARY_MD] + ([ACCURACY_NAME] if result.plot else [])
    click.echo(f"results in {result.output}/{', '.join(written)}")


if __name__ == "__main__":
    main()
