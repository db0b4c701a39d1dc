"""Which models the zoo walk tries, and at which input sizes."""
from __future__ import annotations

import collections
import fnmatch
import math
import re
import warnings

import torch
from zoo_common import NUM_CLASSES

from flexsurgeon.surgery.plan import ARCHITECTURE
from flexsurgeon.surgery.sources import build_source, parse_source


def timm_cfg(name: str):
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def timm_module(name: str) -> str:
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "?")


def tv_family(name: str) -> str:
    return re.match(r"[a-z]+(?:_v\d)?", name).group(0)


def _round_to(value: float, step: int) -> int:
    return max(step, int(math.ceil(value / step)) * step)


def _ladder(native: tuple[int, int], stride: int, minimum: int, fixed: bool) -> list[tuple[int, int]]:
    """Input sizes to try, smallest first: a 2x2 final map, 4x4, the native size, 1.3x native."""
    if fixed:
        return [native]
    h, w = native
    sizes = []
    for side in (2 * stride, 4 * stride):
        side = max(side, minimum)
        if side < max(h, w):
            sizes.append((side, _round_to(side * w / h, 2)) if h != w else (side, side))
    sizes.append(native)
    sizes.append((_round_to(h * 1.3, stride), _round_to(w * 1.3, stride)))
    return list(dict.fromkeys(sizes))


def timm_sizes(name: str) -> list[tuple[int, int]]:
    cfg = timm_cfg(name)
    native = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
    pool = getattr(cfg, "pool_size", None) if cfg is not None else None
    stride = max(1, round(native[0] / pool[0])) if pool and pool[0] else 32
    minimum = max(getattr(cfg, "min_input_size", None) or (0, 0, 0))
    return _ladder(native, stride, minimum, bool(getattr(cfg, "fixed_input_size", False)))


def tv_sizes(name: str) -> list[tuple[int, int]]:
    import torchvision

    native, minimum = (224, 224), 1
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        minimum = max(weights.meta.get("min_size", (1, 1)))
        crop = weights.transforms().crop_size
        native = (int(crop[0]), int(crop[-1]))
    except Exception:  # noqa: BLE001 - no weights enum: keep the defaults
        pass
    fixed = name.startswith("vit_")  # torchvision's ViTs assert their image size
    if fixed:  # built without weights, they take the builder's default, not the weights' crop
        native = (224, 224)
    return _ladder(native, 32, minimum, fixed)


def _smallest(names: list[str], shortlist: int = 4) -> str:
    """A small member of a timm module: of the few shortest names at the smallest input size
    (timm's own ``test_*`` models aside), the one with the fewest parameters."""
    real = [n for n in names if not n.startswith("test_")] or names

    def cheap_key(n):
        cfg = timm_cfg(n)
        return (max(cfg.input_size[1:]) if cfg is not None else 224, len(n), n)

    short = sorted(real, key=cheap_key)[:shortlist]
    counts = {n: param_count_m(parse_source(n, num_classes=NUM_CLASSES)) for n in short}
    return min(short, key=lambda n: (math.inf if counts[n] is None else counts[n], cheap_key(n)))


def _tv_params(name: str) -> int:
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    except Exception:  # noqa: BLE001 - no weights enum
        return 0


def list_candidates(args) -> tuple[list[str], dict[str, str]]:
    """(models to walk, {model: reason} for models listed but not walked)."""
    import timm
    import torchvision

    walk, not_walked = [], {}
    if not args.no_timm:
        by_module = collections.defaultdict(list)
        for name in timm.list_models():
            if name == ARCHITECTURE:  # our own checkpoint architecture, registered in timm
                continue
            cfg = timm_cfg(name)
            if not args.all and (cfg is None or not getattr(cfg, "pool_size", None)):
                not_walked[name] = ("timm's config declares no pool_size (mostly transformers that pool tokens); "
                                    "--all walks it")
                continue
            by_module[timm_module(name)].append(name)
        if args.quick:
            walk += [_smallest(names) for _, names in sorted(by_module.items())]
        else:  # round robin over modules, so a walk cut short still covers every family
            queues = [collections.deque(names) for _, names in sorted(by_module.items())]
            while any(queues):
                for q in queues:
                    if q:
                        walk.append(q.popleft())
    if not args.no_torchvision:
        tv = sorted(torchvision.models.list_models(module=torchvision.models))
        if args.quick:
            families = collections.defaultdict(list)
            for name in tv:
                families[tv_family(name)].append(name)
            tv = [min(names, key=lambda n: (_tv_params(n), n)) for _, names in sorted(families.items())]
        walk = [f"tv:{n}" for n in tv] + walk
    if args.only is not None:
        walk = [n for n in walk if n in args.only]
        not_walked = {n: r for n, r in not_walked.items() if n in args.only}
    if args.filter:
        def keep(n):
            return any(fnmatch.fnmatch(n, p) for p in args.filter)
        walk = [n for n in walk if keep(n)]
        not_walked = {n: r for n, r in not_walked.items() if keep(n)}
    args.truncated = bool(args.limit) and len(walk) > args.limit
    if args.limit:
        walk = walk[:args.limit]
    return walk, not_walked


def param_count_m(spec) -> float | None:
    """Millions of parameters, counted on the meta device (nothing allocated)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_source(spec, "random")
        return sum(p.numel() for p in model.parameters()) / 1e6
    except Exception:  # noqa: BLE001 - some builders need real tensors; count after building
        return None
