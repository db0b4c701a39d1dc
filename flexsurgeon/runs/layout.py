"""The run folder's names, defined once: what finetune writes and every reader looks for.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoints.hub import holds_converted_model
from ..errors import CheckpointError
from ..utils import CONFIG_NAME, is_hub_name

RECIPE_NAME = "recipe.yaml"
RUN_NAME = "run.json"  # the SOURCE and --data a run started from, for --resume and model cards


def checkpoint_folder(path: str | Path) -> Path:
    """The model folder ``path`` means: itself, or a finetune run's ``best/`` (else ``last/``)."""
    path = Path(path)
    for candidate in (path, path / BEST, path / LAST):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise CheckpointError(f"{path} holds no checkpoint: expected {CONFIG_NAME} there or in best/ or last/ "
                          "(a folder written by flexsurgeon convert or finetune)")


def checkpoint_source(source: str | Path) -> str | Path:
    """What a model argument names, for ``load_folder``: an ``hf-hub:ORG/NAME[@REV]`` checkpoint
    as it is (fetched when loaded, so the model records where it came from), else the folder
    ``checkpoint_folder`` finds."""
    return str(source) if is_hub_name(source) else checkpoint_folder(source)


def is_checkpoint_source(source: str | Path) -> bool:
    """A checkpoint (a folder, or a Hub repository that holds a converted model) rather than a
    model to convert (a name, or ``hf-hub:`` of a timm model)."""
    return holds_converted_model(str(source)) if is_hub_name(source) else Path(source).is_dir()


BEST, LAST = "best", "last"  # the checkpoint folders of a finetune run


LOG_NAME = "log.jsonl"  # a finetune run's epoch records


PLOTS_DIR = "plots"  # where ``plot`` writes its PNGs by default


CURVES_NAME = "curves.png"  # a finetune run's loss and top-1 per epoch, by ``plot``


# an ablation folder: what was asked, its runs (RUNS/VARIANT/seedK/, each a finetune run with its
# score) and the comparison; the accuracy plot has the same name where ``ablate`` writes it (the
# folder) and where ``plot`` does (its plots/)
ABLATION_REQUEST, ABLATION_RUNS, SCORE_NAME = "ablation.json", "runs", "score.json"
ABLATION_RESULTS, SUMMARY_MD, SUMMARY_JSON = "results.csv", "summary.md", "summary.json"
ACCURACY_NAME = "accuracy.png"
ACCURACY_BY_EPOCH_NAME = "accuracy_by_epoch.png"  # an ablation's top-1 per epoch, per variant


STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"
