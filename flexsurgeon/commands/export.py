"""Export a converted model for inference: an ONNX file, or a checkpoint folder without SAC heads.

Both forms drop the SAC heads (they exist for training only). ONNX is exported at one
input size: each FlexPool is first frozen at the feature-map size that input gives it
(its weights resampled and normalised once, as ``FlexPool`` would at that size) and the
graph carries those weights as a constant, with no resampling or softmax left in it. The
batch dimension stays dynamic. The exporter is torch's ``torch.export``-based one
(``dynamo=True``), which needs the ``onnx`` and ``onnxscript`` packages
(``pip install 'flexsurgeon[export]'``).

Writes are atomic: files are written into a temporary folder next to the output, then
renamed into place, so a failed export never leaves a half-written file behind.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.io import save
from ..errors import ExportError
from ..layers.pools import FlexPool, FlexPoolNHWC
from ..surgery.apply import pool_paths
from ..surgery.plan import SurgeryPlan
from ..surgery.sac import strip_sac_heads
from ..surgery.state import plan_of
from ..utils import as_size, clip, first_line, replacing

__all__ = ["ONNX_INPUT_NAME", "ONNX_OUTPUT_NAME", "export_inference_folder", "export_onnx"]

ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "output"
INSTALL_HINT = "pip install 'flexsurgeon[export]'"
MIN_TORCH = "2.6"  # torch.onnx.export(dynamo=True) with dynamic_shapes and input/output names
_EXAMPLE_BATCH = 2  # a batch of 1 would let torch.export specialise the batch dimension to 1


class _FrozenFlexPool(nn.Module):
    """A FlexPool with its normalised weights fixed for one feature-map size (inference only),
    returning the form the FlexPool returned."""

    def __init__(self, weights: torch.Tensor, pool: FlexPool):
        super().__init__()
        self.register_buffer("weights", weights)  # (C, H, W), sums to one per channel for pool softmax
        self.nhwc = isinstance(pool, FlexPoolNHWC)
        self.keepdim = pool.keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            y = (x * self.weights.permute(1, 2, 0)).sum((1, 2))
            return y[:, None, None, :] if self.keepdim else y
        return (x * self.weights).sum((2, 3), keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"channels={self.weights.shape[0]}, size={tuple(self.weights.shape[1:])}, keepdim={self.keepdim}"


def _input_size(plan: SurgeryPlan, img_size) -> tuple[int, int]:
    if img_size is None:
        return tuple(plan.img_size)
    size = as_size(img_size)
    if size is None:
        raise ExportError(f"img_size must be a positive integer or a pair (H, W), got {img_size!r}")
    return size


def _example_input(model: nn.Module, plan: SurgeryPlan, size: tuple[int, int]) -> torch.Tensor:
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(_EXAMPLE_BATCH, plan.in_chans, *size, generator=generator).to(device=device, dtype=dtype)


def frozen_for_export(model, example: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` for export: no SAC heads, every FlexPool frozen at the
    feature-map size ``example`` gives it. ``model`` itself is left as it was."""

    frozen_model = copy.deepcopy(strip_sac_heads(model)).eval()
    pools = {path: frozen_model.get_submodule(path) for path in pool_paths(frozen_model.flexsurgeon_plan)}
    pools = {path: pool for path, pool in pools.items() if isinstance(pool, FlexPool)}
    seen: dict[str, tuple[tuple[int, int], torch.dtype]] = {}

    def record(name, nhwc):
        def hook(module, args):
            shape = args[0].shape
            size = (int(shape[1]), int(shape[2])) if nhwc else (int(shape[-2]), int(shape[-1]))
            if seen.setdefault(name, (size, args[0].dtype))[0] != size:
                raise ExportError(f"FlexPool {name} sees two feature-map sizes in one forward; it cannot be frozen")
        return hook

    handles = [pool.register_forward_pre_hook(record(name, isinstance(pool, FlexPoolNHWC)))
               for name, pool in pools.items()]
    try:
        with torch.no_grad():
            frozen_model(example)
    except ExportError:
        raise
    except Exception as exc:
        first = first_line(exc)
        shape = "x".join(map(str, example.shape[1:]))
        raise ExportError(f"the model does not run on a {shape} input ({clip(first, 200)}); "
                          "pick another --img-size") from exc
    finally:
        for handle in handles:
            handle.remove()
    for name, pool in pools.items():
        if name not in seen:  # never reached in eval mode: nothing to freeze
            continue
        size, dtype = seen[name]
        with torch.no_grad():
            weights = pool.pooling_weights(size).to(dtype)
        parent, _, attr = name.rpartition(".")
        setattr(frozen_model.get_submodule(parent) if parent else frozen_model, attr,
                _FrozenFlexPool(weights.detach().clone(), pool))
    return frozen_model


def _check_onnx_exporter() -> None:
    if torch.__version__ < MIN_TORCH:
        raise ExportError(f"ONNX export needs torch>={MIN_TORCH} (installed: {torch.__version__}): "
                          f"pip install -U torch")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                          f"{INSTALL_HINT}")


def check_output_file(path, force: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"output path {path} is a folder; name a file, e.g. {path / 'model.onnx'}")
    if path.exists() and not force:
        raise ExportError(f"output file {path} already exists; pass --force to replace it")
    return path


def write_atomic_file(path: Path, write, force: bool) -> Path:
    """Write ``path`` (and any side files such as external ONNX weights) into a temporary
    folder beside it, then rename each into place, the main file last."""
    path = check_output_file(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc.strerror or exc}") from exc
    try:
        write(tmp / path.name)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)
        if not any(p.name == path.name for p in files):
            raise ExportError(f"the exporter wrote no {path.name}")
        for file in files:
            with replacing(path.parent / file.name) as target:
                os.replace(file, target)
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_onnx(model, path, img_size=None, opset: int | None = None, force: bool = False) -> Path:
    """Export ``model`` (a converted model) to the ONNX file ``path``, without SAC heads.

    The graph takes a ``(batch, in_chans, H, W)`` input named ``input`` at the fixed size
    ``img_size`` (an int or (H, W); default: the plan's size) with a dynamic batch, and
    returns ``output`` (what the model returns in eval mode). FlexPool weights are fixed
    at the feature-map sizes of that input. ``opset`` defaults to torch's choice. Larger
    than 2 GB, the weights go to ``path`` + ``.data`` beside it. ``model`` is not changed.
    """
    plan = plan_of(model, "exported", ExportError)
    size = _input_size(plan, img_size)
    _check_onnx_exporter()
    path = check_output_file(path, force)  # refuse before spending time on the model
    example = _example_input(model, plan, size)
    frozen = frozen_for_export(model, example)
    try:
        program = torch.onnx.export(
            frozen, (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[ONNX_INPUT_NAME], output_names=[ONNX_OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    except ImportError as exc:  # e.g. an onnxscript older than this torch's exporter needs
        raise ExportError(f"torch.onnx could not import {exc.name or exc}; onnx/onnxscript may be too old for "
                          f"torch {torch.__version__}: pip install -U onnx onnxscript") from exc
    except Exception as exc:
        first = first_line(exc)
        raise ExportError(f"torch.onnx could not export {plan.source.label if plan.source else 'the model'}: "
                          f"{clip(first, 300)}") from exc
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:  # torch falls back to its own opset when converting down fails
        raise ExportError(f"torch.onnx could not write ONNX opset {opset} for this model (it wrote {written}); "
                          f"use --opset {written} or later")
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names:  # an ONNX runtime user maps output indices back to classes from the file alone
        program.model.metadata_props["label_names"] = json.dumps(list(names))
    return write_atomic_file(path, lambda destination: program.save(destination), force)


def export_inference_folder(model, out_dir, force: bool = False) -> Path:
    """Save ``model`` without its SAC heads as a convert-style folder (config.json +
    model.safetensors): loadable with ``flexsurgeon.load`` and timm's ``local-dir:``."""

    plan_of(model, "exported", ExportError)
    return save(strip_sac_heads(model), out_dir, force=force)
