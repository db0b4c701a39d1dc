"""The Hugging Face Hub: ``hf-hub:ORG/NAME`` checkpoints, and ``flexsurgeon push`` with a model card.

A Hub repository holds what a checkpoint folder holds (config.json, model.safetensors), so
loading one is downloading those two files through huggingface_hub's cache (which honours
``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``) and reading the cached folder with the same checks
as a local one. ``push`` uploads a folder's two files, a model card written from the plan
and the run's recipe and log, and the run's plots, in one commit. huggingface_hub is the
``hub`` extra (timm depends on it, so it is usually there already).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..checkpoints.folders import write_folder
from ..checkpoints.io import read_config, read_weights_header
from ..data import TIMM_PREFIXES
from ..errors import HubError, PlotError
from ..hub import import_hub, split_repo
from ..runs.layout import LOG_NAME, PLOTS_DIR, RECIPE_NAME, RUN_NAME, checkpoint_folder
from ..runs.log import read_log
from ..surgery.plan import SurgeryPlan
from ..utils import CONFIG_NAME, HUB_PREFIX, WEIGHTS_NAME, clip, first_line, is_hub_name
from ..version import __version__

CARD_NAME = "README.md"
# timm's pretrained tags name the data set the weights were trained on
_TAG_DATASETS = {"in1k": "imagenet-1k", "in12k": "imagenet-12k", "in21k": "imagenet-21k", "in22k": "imagenet-22k"}
CITATION = """@inproceedings{ali2023flexpooling,
  title     = {FlexPooling with Simple Auxiliary Classifiers in Deep Networks},
  author    = {Ali and Alsuwaidi and Khan},
  booktitle = {Proceedings of the 18th International Joint Conference on Computer Vision, Imaging and
               Computer Graphics Theory and Applications (VISAPP)},
  pages     = {497--505},
  year      = {2023},
  note      = {arXiv:2606.14926}
}"""


# --- push -----------------------------------------------------------------------------------


@dataclass
class PushResult:
    files: list[str]
    commit_message: str
    url: str | None  # the commit's, after an upload; None for a dry run
    output: Path | None  # the dry run's folder


@dataclass
class _Pushed:
    """What a push reads from DIR, once: the model folder, its finetune run, the plan, the
    run's final metrics and the plots that go along."""

    folder: Path
    run: Path | None
    config: dict
    plan: SurgeryPlan
    metrics: dict | None
    plots: list[Path]


def _read(directory) -> _Pushed:
    """DIR: a model folder, or a run whose best/ is pushed; its run is DIR or the folder's parent."""

    folder = checkpoint_folder(Path(directory))
    run = next((r for r in (folder, folder.parent) if (r / LOG_NAME).is_file()), None)
    config = read_config(folder)
    plan = SurgeryPlan.from_dict(config["model_args"]["plan"])
    read_weights_header(folder / WEIGHTS_NAME, plan)  # the two files belong together
    return _Pushed(folder, run, config, plan, _final_metrics(run) if run else None, _plots(folder, run))


def _final_metrics(run: Path) -> dict | None:
    try:
        records = read_log(run / LOG_NAME)
    except PlotError:
        return None
    last = records[-1]
    best = max(records, key=lambda r: r["val"]["top1"]["main"])
    return {"epochs": last["epoch"], "top1": last["val"]["top1"], "top5": last["val"].get("top5", {}),
            "best_top1": best["val"]["top1"]["main"], "best_epoch": best["epoch"]}


def _card_data(plan, cfg: dict) -> dict:
    weights = plan.source.weights if plan.source is not None else ""
    data = {"library_name": "timm", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "timm", "flexsurgeon", "flexpool"] + (["sac"] if plan.sac else []),
            "license": cfg.get("license") or "unknown"}
    if weights.startswith(HUB_PREFIX):
        data["base_model"] = weights.removeprefix(HUB_PREFIX)
        tag = data["base_model"].rpartition(".")[2]
        datasets = [name for key, name in _TAG_DATASETS.items() if key in tag.split("_")]
        if datasets:
            data["datasets"] = datasets
    return data


def model_card(directory, repo_id: str) -> str:
    """The README.md (Hub metadata header, then Markdown) for the model folder DIR means."""
    return _card(_read(directory), repo_id)


def _card(pushed: _Pushed, repo_id: str) -> str:
    config, plan, metrics = pushed.config, pushed.plan, pushed.metrics
    cfg = config.get("pretrained_cfg") or {}
    source = plan.source
    label = source.label if source is not None else "a model"
    header = yaml.safe_dump(_card_data(plan, cfg), sort_keys=False).strip()
    lines = ["---", header, "---", f"# {repo_id.split('/')[-1]}", "",
             f"`{label}` with its global average pooling replaced by **FlexPool**"
             + (" and **SAC heads** for training" if plan.sac else "") + ", made with flexsurgeon.", ""]

    lines += ["## Source", "", f"- model: `{label}` ({source.library if source else 'unknown'})"]
    if source is not None and source.kwargs:
        lines.append(f"- built with: `{json.dumps(source.kwargs, sort_keys=True)}`")
    lines.append(f"- weights it started from: {_weights_text(source.weights if source else '')}")
    lines += [f"- input: {plan.in_chans}x{plan.img_size[0]}x{plan.img_size[1]}, {plan.num_classes} classes", ""]

    lines += ["## Surgery", "", "| replaced pool | how | input CxHxW | FlexPool variant | dropout |",
              "|---|---|---|---|---|"]
    lines += [f"| `{p.module or p.node}` | {p.replacement.replace('_', ' ')} | {p.channels}x{p.size[0]}x{p.size[1]} | "
              f"{plan.pool} | {plan.dropout:g} |" for p in plan.pools]
    if plan.sac:
        lines += ["", "SAC heads (training only; `model(x)` does not run them):", "",
                  "| tap | input CxHxW | loss weight |", "|---|---|---|"]
        lines += [f"| `{t.module or t.node}` | {t.channels}x{t.size[0]}x{t.size[1]} | {w:g} |"
                  for t, w in zip(plan.sac, plan.sac_weights)]
        lines.append(f"\nThe main classifier's loss weight is {plan.sac_weights[-1]:g}.")
    elif metrics is not None and any(k.startswith("sac:") for k in metrics["top1"]):
        lines += ["", "SAC heads were used in fine-tuning (see below) and dropped from this checkpoint."]
    else:
        lines += ["", "No SAC heads."]
    lines.append("")

    if pushed.run is not None:
        lines += _training_section(pushed.run, metrics)
    if pushed.plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in pushed.plots] + [""]

    load_args = "" if source is None or source.library != "custom" else ", model=YourModel()"
    lines += ["## How to load", "", "```bash", "pip install flexsurgeon", "```", "", "```python",
              "import flexsurgeon  # registers the converted architecture with timm", "import timm", ""]
    if load_args:
        lines += [f"model = flexsurgeon.load('hf-hub:{repo_id}'{load_args})  # build YourModel as the source was"]
    else:
        lines += [f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)",
                  f"# or: model = flexsurgeon.load('hf-hub:{repo_id}')"]
    lines += ["```", "", "## The method", "",
              "FlexPool is a learned, per-channel weighted average over the positions of the last feature map. "
              "It starts equal to average pooling (all weights 1/(H*W)), so a converted model first gives the "
              "source's outputs, and fine-tuning learns where to look. SAC heads are small auxiliary "
              "classifiers (FlexPool and one linear layer) on intermediate stages; their losses, weighted "
              "below the main one, help training, and inference uses the main classifier only.", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _weights_text(origin: str) -> str:
    if origin.startswith(HUB_PREFIX):
        return f"`{origin.removeprefix(HUB_PREFIX)}` (the Hub)"
    return {"random": "random initialisation", "torchvision:DEFAULT": "torchvision's default pretrained weights",
            "": "as built by its owner"}.get(origin, f"`{origin.removeprefix('file:')}` (a local file)"
                                              if origin.startswith("file:") else f"`{origin}`")


def _data_text(spec: str) -> str:
    """The fine-tuning data as the card names it: a generated or timm data set by its spec, a
    local folder by its own name only (the path means nothing to a reader and may be private)."""
    if spec.startswith("synthetic:"):
        return f"`{spec}` (generated)"
    if spec.lower().startswith(TIMM_PREFIXES):
        return f"`{spec.split(':', 1)[0]}` (timm's data sets)"
    return f"`{Path(spec).name or spec}` (a local folder)"


def _training_section(run: Path, metrics: dict | None) -> list[str]:
    lines = ["## Fine-tuning", ""]
    try:
        data = json.loads((run / RUN_NAME).read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):  # a run from before run.json recorded it
        data = None
    if isinstance(data, str) and data:
        lines += [f"Fine-tuned on {_data_text(data)}.", ""]
    if metrics is not None:
        lines += [f"After {metrics['epochs']} epoch(s), on the run's validation split:", "",
                  "| classifier | top-1 | top-5 |", "|---|---|---|"]
        for head, top1 in metrics["top1"].items():
            top5 = metrics["top5"].get(head)
            lines.append(f"| {head} | {top1:.2f} | {'' if top5 is None else f'{top5:.2f}'} |")
        best = f"{metrics['best_top1']:.2f} (epoch {metrics['best_epoch']})"
        lines += ["", f"The best epoch's main top-1 was {best}.", ""]
    recipe = run / RECIPE_NAME
    if recipe.is_file():
        lines += ["The recipe (`flexsurgeon finetune` settings):", "", "```yaml",
                  recipe.read_text().strip(), "```", ""]
    return lines


def _plots(folder: Path, run: Path | None) -> list[Path]:
    found = {}
    for place in ([run] if run is not None else []) + [folder]:
        for png in sorted((place / PLOTS_DIR).glob("*.png")) if (place / PLOTS_DIR).is_dir() else []:
            found.setdefault(png.name, png)
    return list(found.values())


def _stage(pushed: _Pushed, repo_id: str, out: Path) -> list[str]:
    """Write into ``out`` exactly the files a push uploads; their names, relative to ``out``."""
    shutil.copy2(pushed.folder / CONFIG_NAME, out / CONFIG_NAME)
    shutil.copy2(pushed.folder / WEIGHTS_NAME, out / WEIGHTS_NAME)
    (out / CARD_NAME).write_text(_card(pushed, repo_id))
    names = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
    if pushed.plots:
        (out / PLOTS_DIR).mkdir()
        for png in pushed.plots:
            shutil.copy2(png, out / PLOTS_DIR / png.name)
            names.append(f"{PLOTS_DIR}/{png.name}")
    return names


def push(directory, repo_id: str, *, private: bool = False, revision: str | None = None, dry_run=None,
         force: bool = False) -> PushResult:
    """Upload the model folder DIR means (a convert, finetune or export folder) to ``repo_id``
    in one commit, with a model card; ``dry_run=OUT`` writes the same files to OUT instead
    (replacing an existing OUT only with ``force``)."""

    if is_hub_name(directory):
        raise HubError(f"push uploads a model folder, and {directory} is on the Hub already: to publish it "
                       "elsewhere, export it to a folder first (flexsurgeon export)")
    repo, rev = split_repo(repo_id)
    revision = revision or rev
    pushed = _read(directory)
    plan = pushed.plan
    label = plan.source.label if plan.source is not None else "model"
    message = f"Add {label} with FlexPool (flexsurgeon {__version__})"
    if dry_run is not None:
        names: list[str] = []
        out = write_folder(Path(dry_run), lambda tmp: names.extend(_stage(pushed, repo, tmp)), force=force)
        return PushResult(names, message, None, out)

    hub = import_hub()
    api = hub.HfApi(library_name="flexsurgeon", library_version=__version__)
    try:
        api.whoami()
    except Exception as exc:  # no token, a bad token or no network: nothing has been sent
        raise HubError(f"cannot push to the Hub: {clip(first_line(exc), 200)} (log in with `hf auth login` or "
                       "set HF_TOKEN; --dry-run OUT writes the files without uploading)") from None
    with tempfile.TemporaryDirectory(prefix="flexsurgeon-push-") as tmp:
        names = _stage(pushed, repo, Path(tmp))
        created = None  # what this push made before its upload: removed again if the upload fails
        try:
            if not api.repo_exists(repo):
                api.create_repo(repo, private=private)
                created = "repository"
            elif private and not api.repo_info(repo).private:
                raise HubError(f"{repo} exists and is public: --private applies when push creates the repository "
                               "(make it private on the Hub, or push without --private)")
            if revision and revision not in {b.name for b in api.list_repo_refs(repo).branches}:
                api.create_branch(repo, branch=revision)
                created = created or "branch"
            commit = api.upload_folder(repo_id=repo, folder_path=tmp, commit_message=message, revision=revision)
        except HubError:  # refused before anything was created or sent
            raise
        except Exception as exc:  # one commit: it landed whole or not at all
            left = _undo(api, repo, revision, created)
            raise HubError(f"push to {repo} failed, nothing was uploaded{left}: {clip(first_line(exc), 200)}") from None
    return PushResult(names, message, str(getattr(commit, "commit_url", commit)), None)


def _undo(api, repo: str, revision: str | None, created: str | None) -> str:
    """Delete the empty repository or branch a failed push created; what is left, for the message."""
    if created is None:
        return ""
    what = f"repository {repo}" if created == "repository" else f"branch {revision} of {repo}"
    try:
        if created == "repository":
            api.delete_repo(repo)
        else:
            api.delete_branch(repo, branch=revision)
    except Exception:  # the network that failed the upload may fail this too: say what is left
        return f" (the empty {what} it created is left on the Hub: delete it there)"
    return f" (the {what} it created is deleted again)"


__all__ = ["model_card", "push", "PushResult"]
