"""The run folder's names, defined once: what finetune writes and every reader looks for.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoints.names import CONFIG_NAME
from ..errors import CheckpointError

RECIPE_NAME = "recipe.yaml"


def checkpoint_folder(path: str | Path) -> Path:
    """The model folder ``path`` means: itself, or a finetune run's ``best/`` (else ``last/``)."""
    path = Path(path)
    for candidate in (path, path / BEST, path / LAST):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise CheckpointError(f"{path} holds no checkpoint: expected {CONFIG_NAME} there or in best/ or last/ "
                          "(a folder written by flexsurgeon convert or finetune)")


BEST, LAST = "best", "last"  # the checkpoint folders of a finetune run


LOG_NAME = "log.jsonl"  # a finetune run's epoch records


PLOTS_DIR = "plots"


ABLATION_RESULTS = "results.csv"


CURVES_NAME, ABLATION_NAME = "curves.png", "ablation.png"


STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"
