"""The training state a checkpoint carries so that ``--resume`` continues exactly where the last
finished epoch left off: the optimizer, scheduler, EMA weights and every random generator,
as safetensors plus JSON (never a pickle), and the run's resolved recipe as YAML."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..runs.layout import RECIPE_NAME, STATE_JSON, STATE_TENSORS
from .recipe import Recipe


def state_writers(optimizer, scheduler, ema, progress: dict, recipe: Recipe) -> dict:
    """``{file name: write(path)}`` for ``io.save``'s ``extra_files``: the training state and
    the recipe. ``progress`` (epoch, step, best so far) is stored as given."""

    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if ema is not None:
        for name, value in ema.module.state_dict().items():
            tensors[f"ema.{name}"] = value.detach().cpu().contiguous()
    np_state = np.random.get_state()
    meta = {
        **progress,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_python": random.getstate(),
        "rng_numpy": [np_state[0], np_state[1], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "recipe": recipe.to_dict(),
    }
    text = json.dumps(json_ready(meta))  # fails here, before the folder is written

    return {
        STATE_TENSORS: lambda path: save_file(tensors, str(path)),
        STATE_JSON: lambda path: path.write_text(text),
        RECIPE_NAME: lambda path: write_recipe(path, recipe),
    }


def write_recipe(path: Path, recipe: Recipe) -> None:
    path.write_text("# the fully resolved recipe of this run\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def restore_state(directory: Path, optimizer, scheduler, ema) -> dict:
    """Load the training state in ``directory`` into the optimizer, scheduler, EMA and random
    generators; returns the progress ``state_writers`` was given."""

    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: its training state is missing or unreadable "
                              f"({exc})") from exc
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if ema is not None:
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    _restore_rng(meta, tensors)
    return meta


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def json_ready(value):
    """``value`` with tensors and numpy values as plain lists and numbers, for ``json.dumps``."""
    if isinstance(value, dict):
        # Older torch keeps functions in some scheduler states (OneCycleLR's anneal_func in 2.3,
        # not in 2.11); the rebuilt scheduler already has them, so they are left out, not saved as None.
        return {str(k): json_ready(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _restore_rng(meta: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


