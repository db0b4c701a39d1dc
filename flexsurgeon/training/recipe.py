"""Fine-tuning recipes: a frozen dataclass, read from YAML and validated field by field.

A recipe is every knob of a `finetune` run. Files in ``recipes/`` (shipped inside the
package as ``flexsurgeon/recipes``) are loaded by name; any field can be overridden from
the command line (``--set key=value``); the fully resolved recipe is written next to the
checkpoints. Unknown keys, wrong types and impossible values are one-line errors naming
the key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import RecipeError
from ..layers.kinds import POOL_KINDS
from ..utils import as_size, parse_size

RECIPE_DIR = Path(__file__).parent.parent / "recipes"
SCHEDULES = ("cosine", "onecycle", "step", "constant", "none")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning run. Defaults are a short, safe fine-tune."""

    # schedule
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"  # any timm optimizer name (timm.optim.list_optimizers())
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: str = "cosine"  # cosine | onecycle | step | constant | none
    warmup_epochs: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    # what trains when: the new parameters (FlexPool, classifier, SAC heads) alone first
    freeze_epochs: int = 0
    freeze_backbone: bool = False  # keep the backbone frozen for the whole run (linear probe)
    # loss
    label_smoothing: float = 0.1
    sac_weights: list[float] | None = None  # heads, then main; None: the model's plan
    reg_weight: float = 1e-3  # weight of the linear FlexPool regulariser
    mixup: float = 0.0
    cutmix: float = 0.0
    # model, used when SOURCE is a model name (a converted folder keeps its own)
    pool: str = "softmax"
    dropout: float = 0.0
    img_size: int | list[int] | None = None
    # EMA of the weights (timm ModelEmaV3); scores and best/ are the EMA's when it is on
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False  # timm's --model-ema-warmup: the decay rises from 0 towards ema_decay
    # data
    val_split: float = 0.1  # for data without a val part of its own (or with val_from_train)
    val_from_train: bool = False  # carve val from train even where the data has val/test: to pick settings
    train_subset: int | None = None  # train on a seeded random subset of this many images
    workers: int = 2
    hflip: float = 0.5
    scale: list[float] | None = None  # random-resized-crop area range [min, max]; None: timm's (0.08, 1)
    # runtime
    device: str = "auto"
    amp: bool = True  # bfloat16 autocast on CUDA; CPU always trains in float32
    channels_last: bool = True  # on CUDA
    compile: bool = False
    seed: int = 0
    keep_sac: bool = False  # keep SAC heads in best/ (last/ always keeps them)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        _check(self.lr > 0, "lr", self.lr, "must be positive")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check_optimizer(self.optimizer)
        _check(self.sched in SCHEDULES, "sched", self.sched, f"must be one of {', '.join(SCHEDULES)}")
        _check(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0, "warmup_epochs",
               self.warmup_epochs, "must be below epochs")
        _check(self.min_lr >= 0, "min_lr", self.min_lr, "must be >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be positive")
        _check(0 <= self.freeze_epochs <= self.epochs, "freeze_epochs", self.freeze_epochs, "must be in [0, epochs]")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if self.sac_weights is not None:
            w = self.sac_weights
            _check(len(w) >= 1 and all(x > 0 for x in w), "sac_weights", w, "must be positive numbers")
            _check(all(b > a for a, b in zip(w, w[1:])), "sac_weights", w,
                   "must increase with depth (heads, then main), e.g. [0.1, 0.2, 0.7]")
        _check(self.reg_weight >= 0, "reg_weight", self.reg_weight, "must be >= 0")
        _check(0 <= self.mixup and 0 <= self.cutmix, "mixup", self.mixup, "mixup and cutmix must be >= 0")
        _check(self.pool in POOL_KINDS, "pool", self.pool, f"must be one of {', '.join(POOL_KINDS)}")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.img_size is None or min(as_size(self.img_size)) >= 8, "img_size", self.img_size,
               "must be at least 8")
        _check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in (0, 1)")
        _check(self.ema or not self.ema_warmup, "ema_warmup", self.ema_warmup, "applies only with ema: true")
        _check(0 <= self.val_split < 1, "val_split", self.val_split, "must be in [0, 1)")
        _check(self.train_subset is None or self.train_subset >= 1, "train_subset", self.train_subset,
               "must be at least 1")
        _check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        _check(0 <= self.hflip <= 1, "hflip", self.hflip, "must be in [0, 1]")
        _check(self.scale is None or (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1), "scale",
               self.scale, "must be [min, max] with 0 < min <= max <= 1")
        _check(self.device in DEVICES, "device", self.device, f"must be one of {', '.join(DEVICES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Recipe:
        return from_dict({**self.to_dict(), **changes}, source="overrides")


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        error = RecipeError(f"recipe field '{key}' = {value!r} {why}")
        error.field = key
        raise error


def _check_optimizer(name: str) -> None:
    """``name`` must be one timm's ``create_optimizer_v2`` builds: a registered name, any case,
    optionally with timm's ``lookahead_`` prefix; otherwise one line with a close match and the choices."""
    known = _timm_optimizers()
    if known is None:
        _check(_old_timm_builds(name), "optimizer", name, "is not an optimizer this timm knows (see timm's "
               "create_optimizer_v2 for the names)")
        return
    *prefix, base = name.lower().split("_")
    if base in known and prefix in ([], ["lookahead"]):
        return
    import difflib

    close = [base] if base in known else difflib.get_close_matches(base, known, n=1)
    hint = f" (did you mean '{'lookahead_' if prefix else ''}{close[0]}'?)" if close else ""
    common = ", ".join(n for n in ("sgd", "momentum", "adam", "adamw", "lamb", "lion", "rmsprop") if n in known)
    raise RecipeError(f"recipe field 'optimizer' = {name!r} is not an optimizer timm knows{hint}; choose one of "
                      f"its {len(known)} (e.g. {common}; all: timm.optim.list_optimizers()), optionally as "
                      "lookahead_NAME")


@functools.cache
def _timm_optimizers() -> tuple[str, ...] | None:
    """timm's optimizer names, lower case; None for a timm without the registry (before 1.0.12)."""
    try:
        from timm.optim import list_optimizers
    except ImportError:
        return None
    return tuple(sorted({name.lower() for name in list_optimizers()}))


@functools.cache
def _old_timm_builds(name: str) -> bool:
    """Whether an old timm builds optimizer ``name`` for one parameter (it asserts on unknown names)."""
    import torch
    from timm.optim import create_optimizer_v2

    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], opt=name, lr=0.01)
    except (AssertionError, ValueError, KeyError):
        return False
    except Exception:  # a known name that needs a missing extra (apex, bitsandbytes): training says so
        return True
    return True


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(Recipe)}


def _coerce(key: str, value, type_name: str, source: str):
    """Check a YAML value against the field's declared type (ints are accepted as floats)."""
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{source}: recipe field '{key}' must not be empty")
    base = type_name.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
            return float(value)
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base == "int | list[int]":  # a size: N, [H, W] or "HxW"; kept as N when square
        size = _size_or_none(value)
        if size is not None:
            return size[0] if size[0] == size[1] else list(size)
    elif base == "list[float]":
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
                                           for v in value):
            return [float(v) for v in value]
    wanted = {"int | list[int]": "a size, N or HxW", "list[float]": "a list of finite numbers",
              "int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[base]
    raise RecipeError(f"{source}: recipe field '{key}' must be {wanted}, got {value!r}")


def _size_or_none(value):
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            return None
    return None if isinstance(value, bool) else as_size(value)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def from_dict(data, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of fields, got {type(data).__name__}")
    types = _field_types()
    unknown = sorted((k for k in data if k not in types), key=str)  # YAML keys may be numbers or null
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), list(types), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"{source}: unknown recipe field '{unknown[0]}'{hint}")
    values = {k: _coerce(k, v, types[k], source) for k, v in data.items()}
    return Recipe(**values)


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | None) -> Recipe:
    """A shipped recipe by name (``smoke``), or a YAML file; None gives the defaults."""
    import yaml

    if name_or_path is None:
        return Recipe()
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"recipe '{name_or_path}' not found: give a YAML file or one of {', '.join(available())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: a date such as 2024-13-01
        raise RecipeError(f"{path} is not valid YAML: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from exc
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    return from_dict(data, source=str(path))


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` from the command line; the value is read as YAML (``lr=0.1``, ``ema=true``)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{text}' must look like key=value")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # then the text itself, which the field check judges
        value = raw
    return key.strip(), value


def with_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    if not overrides:
        return recipe
    try:
        return from_dict({**recipe.to_dict(), **overrides}, source="command line")
    except RecipeError as exc:
        field = getattr(exc, "field", None)
        if field is None or field in overrides:
            raise
        # the recipe's own value clashes with an override (warm-up epochs against --epochs 1): say so
        given = ", ".join(f"{k}={v}" for k, v in overrides.items())
        raise RecipeError(f"{exc}: that is the recipe's value, and with {given} from the command line it must "
                          f"change too (--set {field}=VALUE)") from None
