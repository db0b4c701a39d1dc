"""``flexsurgeon finetune`` as library code: the model (a converted folder, or a name converted
first), the data and the recipe resolved, then ``finetune``; ``--resume`` picks the run up.

What a converted folder fixes (its pool, dropout, input size, SAC heads and their weights) is
the folder's: a value given for one of them on the command line that differs is refused in one
line, a recipe file's is replaced by the folder's (with a note), and ``recipe.yaml`` records
what the run used. ``run.json`` records the SOURCE and data a run started from, so a resume
with another SOURCE is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoints.folders import recover
from ..checkpoints.io import load_folder, read_config
from ..checkpoints.locks import hold
from ..errors import CheckpointError, TrainingError
from ..runs.layout import BEST, LAST, RECIPE_NAME, RUN_NAME, STATE_JSON, is_checkpoint_source
from ..surgery.convert import convert
from ..surgery.model_code import is_model_code
from ..utils import is_hub_name, write_text_replacing
from .heads import reset_head
from .loop import FinetuneResult, finetune
from .recipe import Recipe, load_recipe, with_overrides
from .run_data import checkpoint_data, data_config_for_name, load_run_data
from .setup import seed_everything

# recipe fields a conversion decides: with a converted folder as SOURCE they are the folder's
CONVERSION_FIELDS = ("pool", "dropout", "img_size", "sac_weights")


def run(source: str, data_spec: str, recipe: Recipe, output: str | Path, *, resume: bool = False,
        overrides: dict | None = None, weights: str | Path | None = None, sac_stages=None, in_chans: int = 3,
        replace_gating: bool = False, model_code: str | None = None, num_classes: int | None = None,
        progress: bool = True, log=print) -> FinetuneResult:
    """``flexsurgeon finetune``: resolve the model (a converted folder or a name to convert), the
    data and the recipe, then fine-tune. On ``resume`` the recipe saved in ``output/last`` is used,
    with ``overrides`` on top (e.g. more epochs). ``model_code`` (``FILE.py:FACTORY``) builds the
    source of a folder converted from a custom model; a source given as ``FILE.py:FACTORY`` is its own.
    ``num_classes`` re-initialises a converted folder's classifier and SAC heads for that many classes."""
    if model_code is not None and not is_checkpoint_source(source):
        raise TrainingError(f"--model-code builds the source of a converted folder; {source} is not one "
                            "(to fine-tune your own model, give FILE.py:FACTORY as SOURCE)")
    if is_model_code(source):
        model_code = source
    output = Path(output)
    with hold(output):
        return _run_held(source, data_spec, recipe, output, resume=resume, overrides=overrides,
                         weights=weights, sac_stages=sac_stages, in_chans=in_chans,
                         replace_gating=replace_gating, model_code=model_code, num_classes=num_classes,
                         progress=progress, log=log)


def _run_held(source, data_spec, recipe, output: Path, *, resume, overrides, weights, sac_stages, in_chans,
              replace_gating, model_code, num_classes, progress, log) -> FinetuneResult:
    """``run`` once the run folder is this process's."""
    if resume:
        last = output / LAST
        for folder in (last, output / BEST):  # what killed saves left: this run is their writer now
            recover(folder)
        if (last / STATE_JSON).is_file():
            _check_same_source(output, source)
            recipe = with_overrides(load_recipe(last / RECIPE_NAME), overrides or {})
            seed_everything(recipe.seed)
            model = load_folder(last, model_code)
            data = checkpoint_data(data_spec, model, recipe)
            return finetune(model, data, recipe, output, resume=True, progress=progress, log=log)
        if last.exists():
            raise CheckpointError(f"cannot resume: {last} has no training state; move it away to start the run again")
        # a preemptible job reruns one command: before the first checkpoint, that starts the run
        log(f"nothing to resume in {output} yet: starting the run")

    if (output / LAST).exists():
        raise CheckpointError(f"{output} already holds a run; pass --resume to continue it or choose another -o")
    seed_everything(recipe.seed)
    if is_checkpoint_source(source):  # a converted folder, or one on the Hub
        if not is_hub_name(source):
            read_config(source)  # a clear error for a folder that is not a checkpoint
        _refuse_conversion_options(source, weights=weights, sac_stages=sac_stages, in_chans=in_chans,
                                   replace_gating=replace_gating)
        model = load_folder(source, model_code)
        recipe = _as_converted(recipe, model.flexsurgeon_plan, overrides or {}, source, log)
        data = checkpoint_data(data_spec, model, recipe)
    else:
        data = load_run_data(data_spec, data_config_for_name(source, recipe.img_size, in_chans), in_chans, recipe)
        seed_everything(recipe.seed)
        model = convert(source, weights=weights or "random", num_classes=data.num_classes, img_size=recipe.img_size,
                        in_chans=in_chans, pool=recipe.pool, dropout=recipe.dropout, sac_stages=sac_stages,
                        sac_weights=recipe.sac_weights, replace_gating=replace_gating, progress=progress)
    if "val_split" in (overrides or {}) and not data.val_carved:
        raise TrainingError(f"--val-split carves val out of train, and {data_spec} has a val part of its own "
                            "(--set val_from_train=true carves val from its train part instead)")
    if (overrides or {}).get("keep_sac") and not model.flexsurgeon_plan.sac:
        raise TrainingError("--keep-sac keeps the SAC heads in best/, and this model has none")
    if num_classes is not None:
        reset_head(model, num_classes, data.num_classes, log)
    if os.environ.get("RANK", "0") == "0":  # one writer under torchrun
        output.mkdir(parents=True, exist_ok=True)
        write_text_replacing(output / RUN_NAME, json.dumps({"source": str(source), "data": data_spec}, indent=2))
    return finetune(model, data, recipe, output, progress=progress, log=log)


def _check_same_source(output: Path, source) -> None:
    """A resume continues the run it names: another SOURCE is refused, naming both."""
    path = output / RUN_NAME
    try:
        started = json.loads(path.read_text()).get("source") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        started = None
    if started is not None and str(source) != started and Path(str(source)).resolve() != Path(started).resolve():
        raise TrainingError(f"{output} is a run of {started}, not of {source}: resume it with {started} as SOURCE, "
                            "or choose another -o to start a run of this one")


def _refuse_conversion_options(source, *, weights, sac_stages, in_chans, replace_gating) -> None:
    """Options that choose how a model is converted cannot apply to a folder converted already."""
    given = [name for name, used in (("--sac-stages", sac_stages is not None), ("--in-chans", in_chans != 3),
                                     ("--replace-gating", replace_gating),
                                     ("--weights/--random-init", weights not in (None, "pretrained"))) if used]
    if given:
        raise TrainingError(f"{given[0]} applies when converting a model name; {source} is converted already "
                            "(its weights and SAC heads are in the folder): convert again, or finetune from the "
                            "model name")


def _as_converted(recipe: Recipe, plan, overrides: dict, source, log) -> Recipe:
    """``recipe`` with the fields the folder's conversion decided; a command-line value that differs
    is refused, a recipe file's is replaced with a note."""
    size = plan.img_size[0] if plan.img_size[0] == plan.img_size[1] else list(plan.img_size)
    folder = {"pool": plan.pool, "dropout": plan.dropout, "img_size": size,
              "sac_weights": list(plan.sac_weights) if plan.sac else None}
    for key in CONVERSION_FIELDS:
        wanted = getattr(recipe, key)
        if wanted is None or _same(wanted, folder[key]):
            continue
        shown = folder[key] if folder[key] is not None else "no SAC heads"
        if key in overrides:
            raise TrainingError(f"--{key.replace('_', '-')} is chosen at convert; {source} has {key} {shown}: "
                                "convert again, or finetune from the model name")
        log(f"note: the recipe's {key} {wanted} does not apply: {source} was converted with {shown}")
    return recipe.replace(**folder)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (list, tuple)) and len(a) == 2 and a[0] == a[1]:
        return _same(a[0], b)
    return a == b if not isinstance(a, float) and not isinstance(b, float) else abs(a - b) < 1e-9

