"""The surgery plan: what `convert` changes, as a small record that round-trips JSON.

Analysis decides, the plan records, apply carries out. A plan names graph nodes of the
source model traced with flexsurgeon's tracer; applying it to a fresh instance of the
same source rebuilds the same architecture, which is how checkpoints load. Plans are
data: loading one never imports or evaluates anything it names.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

from ..errors import PlanError
from ..layers.kinds import POOL_KINDS

ARCHITECTURE = "flexsurgeon"  # the timm architecture that rebuilds a converted model from its plan
PLAN_VERSION = 3  # 3: pool (was pool_mode), PoolEdit.replacement (was method); older plans are refused
LIBRARIES = ("timm", "torchvision", "custom")  # custom: the user's own nn.Module, rebuilt by the user
REPLACEMENTS = ("in_place", "graph_rewrite")  # how a pool is replaced: a module swapped, or code rewritten
FORWARDS = ("forward", "forward_head")  # the methods a graph rewrite may regenerate
READS = ("output", "input")  # and "output[K]": element K of the tuple a module returns
_OUTPUT_ITEM = re.compile(r"^output\[(\d+)\]$")
LAYOUTS = ("nchw", "nhwc", "tokens")
PAPER_MAIN_WEIGHT = 0.7  # the paper's lambdas: 0.1, 0.2 for two SAC heads, 0.7 for the main classifier
_NODE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE_PATH = re.compile(r"^([A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*)?$")  # looked up, never evaluated
_SCALAR = (str, int, float, bool, type(None))
# builder arguments that fetch or read weights: a plan never sets them (weights come from the checkpoint)
_LOADER_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "checkpoint_path",
                  "cache_dir", "weights", "weights_backbone", "progress")


@dataclass(frozen=True)
class SourceSpec:
    """How to build the unconverted model: a timm name or a torchvision builder, and its
    arguments; for a custom model, its class name (for information: the user builds it)."""

    library: str
    name: str
    kwargs: dict = field(default_factory=dict)
    # where the converted weights started, for people reading the folder (a model card):
    # hf-hub:ID, torchvision:DEFAULT, file:NAME or random; "" when the caller built the model
    weights: str = ""

    @property
    def label(self) -> str:
        return {"timm": self.name, "torchvision": f"tv:{self.name}"}.get(self.library, f"custom {self.name}")


@dataclass(frozen=True)
class PoolEdit:
    """Replace a pool with FlexPool sized ``channels x size``; ``replacement`` says how.

    ``in_place``: the module at ``module`` is the pool; a FlexPool returning the same form
    (``keepdim``, ``layout``) takes its place on its parent. ``graph_rewrite``: the pool is
    code inside the forward of the module at ``module`` ("" for the model itself); that one
    module's forward is regenerated with the pool node ``node`` (reading ``input``, names
    in that module's own trace) replaced.
    """

    node: str
    input: str
    channels: int
    size: tuple[int, int]
    keepdim: bool = False
    layout: str = "nchw"  # or "nhwc": the input map is (B, H, W, C)
    module: str = ""
    replacement: str = "in_place"
    forward: str = "forward"  # graph_rewrite: the method regenerated, forward or timm's forward_head
    # layout "tokens": a (B, N, C) sequence, size (1, N); start ("mean", first, last) or ("token", index),
    # the prefix tokens before the patches and their grid (Hp, Wp) when they form one
    start: tuple = ()
    prefix: int = 0
    grid: tuple = ()

    @property
    def reduction(self) -> str:
        """What the source pool computed: "mean" (over positions or tokens) or "token" (one token)."""
        return "token" if self.layout == "tokens" and self.start and self.start[0] == "token" else "mean"


@dataclass(frozen=True)
class SacTap:
    """A SAC head on the feature map at ``node``, read by a forward hook on the module at
    ``module``: its output, element K of the tuple it returns (``read="output[K]"``), or
    (``read="input"``) its first input."""

    node: str
    channels: int
    size: tuple[int, int]
    module: str = ""
    read: str = "output"
    layout: str = "nchw"  # as for PoolEdit; a head on "tokens" pools all N tokens
    prefix: int = 0
    grid: tuple = ()

    @property
    def output_item(self) -> int | None:
        """K of ``read="output[K]"``; None for a whole output or an input."""
        found = _OUTPUT_ITEM.match(self.read)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class SurgeryPlan:
    source: SourceSpec | None
    num_classes: int
    in_chans: int
    img_size: tuple[int, int]
    pools: tuple[PoolEdit, ...]
    sac: tuple[SacTap, ...] = ()
    sac_weights: tuple[float, ...] = (1.0,)  # one per SAC head, then the main classifier's
    pool: str = "softmax"  # the pool kind, as in recipes and --pool (see layers.kinds)
    dropout: float = 0.0
    version: int = PLAN_VERSION

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise PlanError naming the first bad field; a plan is checked before any model is built."""
        _check_version(self.version)
        if self.source is not None:
            if self.source.library not in LIBRARIES:
                raise PlanError(f"plan source.library {self.source.library!r} is not one of {', '.join(LIBRARIES)}")
            if not isinstance(self.source.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.source.name):
                raise PlanError(f"plan source.name {self.source.name!r} is not a model name")
            if not isinstance(self.source.kwargs, dict) or not all(
                    isinstance(k, str) and _plain(v) for k, v in self.source.kwargs.items()):
                raise PlanError("plan source.kwargs must map names to plain values (str, int, finite float, bool, "
                                "null, or a list of those)")
            loaders = sorted(set(self.source.kwargs) & set(_LOADER_KWARGS))
            if loaders:
                raise PlanError(f"plan source.kwargs may not set {', '.join(loaders)}: a checkpoint's weights come "
                                "from its model.safetensors, never from a path or download named in a plan")
            if not isinstance(self.source.weights, str) or len(self.source.weights) > 300:
                raise PlanError("plan source.weights must be a short text")
        for key in ("num_classes", "in_chans"):
            value = getattr(self, key)
            if not _positive_int(value):
                raise PlanError(f"plan {key} must be a positive integer, got {value!r}")
        if not _size(self.img_size):
            raise PlanError(f"plan img_size must be two positive integers, got {self.img_size!r}")
        if self.pool not in POOL_KINDS:
            raise PlanError(f"plan pool {self.pool!r} is not one of {', '.join(POOL_KINDS)}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise PlanError(f"plan dropout must be in [0, 1), got {self.dropout!r}")
        if not self.pools:
            raise PlanError("plan replaces no pool")
        for site in (*self.pools, *self.sac):
            if not isinstance(site.node, str) or not _NODE_NAME.match(site.node):
                raise PlanError(f"plan node name {site.node!r} is not a graph node name")
            if not _positive_int(site.channels) or not _size(site.size):
                raise PlanError(f"plan entry for node {site.node!r} has bad channels/size")
            keepdim, module = getattr(site, "keepdim", False), getattr(site, "module", "")
            if not isinstance(keepdim, bool) or not isinstance(module, str):
                raise PlanError(f"plan entry for node {site.node!r}: keepdim must be true or false, module a string")
        for pool in self.pools:
            if not isinstance(pool.input, str) or not _NODE_NAME.match(pool.input):
                raise PlanError(f"plan pool input {pool.input!r} is not a graph node name")
            if pool.layout not in LAYOUTS:
                raise PlanError(f"plan pool layout {pool.layout!r} is not one of {', '.join(LAYOUTS)}")
            if pool.replacement not in REPLACEMENTS:
                raise PlanError(f"plan pool replacement {pool.replacement!r} is not one of {', '.join(REPLACEMENTS)}")
            if pool.replacement == "in_place" and not pool.module:
                raise PlanError(f"plan pool {pool.node!r} is replaced in place but names no module")
            if pool.forward not in FORWARDS:
                raise PlanError(f"plan pool forward {pool.forward!r} is not one of {', '.join(FORWARDS)}")
        for site in (*self.pools, *self.sac):
            _check_tokens(site)
            if not _MODULE_PATH.match(site.module):
                raise PlanError(f"plan module path {site.module!r} is not a module path")
        for tap in self.sac:
            if tap.layout not in LAYOUTS:
                raise PlanError(f"plan SAC tap layout {tap.layout!r} is not one of {', '.join(LAYOUTS)}")
            if (tap.read not in READS and tap.output_item is None) or not tap.module:
                raise PlanError(f"plan SAC tap {tap.node!r} must name a module and read its output, an element "
                                "of it (output[K]) or its input")
        names = [(p.module, p.forward, p.node) for p in self.pools] + [("sac_heads", "", t.node) for t in self.sac]
        if len(set(names)) != len(names):
            raise PlanError("plan names the same node twice")
        weights = self.sac_weights
        if len(weights) != len(self.sac) + 1:
            raise PlanError(f"plan has {len(self.sac)} SAC heads, so sac_weights needs {len(self.sac) + 1} "
                            f"values (heads, then main); got {len(weights)}")
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < w < math.inf for w in weights):
            raise PlanError(f"plan sac_weights must be positive numbers, got {list(weights)}")
        if any(b <= a for a, b in zip(weights, weights[1:])):
            raise PlanError(f"plan sac_weights {list(weights)} must increase with depth (the paper's 0.1, 0.2, 0.7)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["img_size"] = list(self.img_size)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data) -> SurgeryPlan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        if "version" in data:  # first: an older plan's fields are not this version's
            _check_version(data["version"])
        known = {"source", "num_classes", "in_chans", "img_size", "pools", "sac", "sac_weights",
                 "pool", "dropout", "version"}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise PlanError(f"plan has unknown field(s): {', '.join(unknown)}")
        missing = sorted({"num_classes", "in_chans", "img_size", "pools", "version"} - set(data))
        if missing:
            raise PlanError(f"plan is missing field(s): {', '.join(missing)}")
        try:
            source = data.get("source")
            if source is not None:
                _check_keys(source, {"library", "name", "kwargs", "weights"}, "source")
                kwargs = source.get("kwargs")
                if isinstance(kwargs, dict):  # JSON has lists where the builder was given tuples
                    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
                    source = {**source, "kwargs": kwargs}
                source = SourceSpec(**source)
            pool_keys = {"node", "input", "channels", "size", "keepdim", "layout", "module", "replacement",
                         "forward", "start", "prefix", "grid"}
            tap_keys = {"node", "channels", "size", "module", "read", "layout", "prefix", "grid"}
            pools = tuple(PoolEdit(**_sized(_check_keys(p, pool_keys, "pools"))) for p in _list(data["pools"], "pools"))
            sac = tuple(SacTap(**_sized(_check_keys(t, tap_keys, "sac"))) for t in _list(data.get("sac", []), "sac"))
            return cls(
                source=source, num_classes=data["num_classes"], in_chans=data["in_chans"],
                img_size=_tuple(data["img_size"]), pools=pools, sac=sac,
                sac_weights=tuple(_list(data.get("sac_weights", [1.0]), "sac_weights")),
                pool=data.get("pool", "softmax"), dropout=data.get("dropout", 0.0),
                version=data["version"],
            )
        except TypeError as exc:  # a field of the wrong shape (e.g. a pool that is not an object)
            raise PlanError(f"plan is malformed: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> SurgeryPlan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _check_version(version) -> None:
    if version != PLAN_VERSION:
        raise PlanError(f"plan version {version!r} is not supported (this flexsurgeon reads {PLAN_VERSION}); "
                        "convert the source model again with this version")


def _scalar(value) -> bool:
    return isinstance(value, _SCALAR) and not (isinstance(value, float) and not math.isfinite(value))


def _plain(value) -> bool:
    """A scalar, or a tuple of scalars (a builder argument such as LeViT's ``depth=(2, 3, 4)``)."""
    return _scalar(value) or (isinstance(value, tuple) and all(map(_scalar, value)))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(_positive_int(v) for v in value)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _list(value, name):
    if not isinstance(value, list):
        raise PlanError(f"plan field '{name}' must be a list, got {type(value).__name__}")
    return value


def _check_keys(entry, allowed: set, name: str) -> dict:
    if not isinstance(entry, dict):
        raise PlanError(f"plan field '{name}' must hold objects, got {type(entry).__name__}")
    extra = sorted(set(entry) - allowed)
    if extra:
        raise PlanError(f"plan field '{name}' has unknown key(s): {', '.join(extra)}")
    return entry


def _sized(entry: dict) -> dict:
    """JSON lists back to the tuples a plan holds."""
    tuples = {k: _tuple(entry[k]) for k in ("start", "grid") if k in entry}
    return {**entry, **tuples, "size": _tuple(entry.get("size"))}


def _check_tokens(site) -> None:
    """A token site reads a valid range or token of its ``N`` tokens, its prefix and grid add up
    to ``N``; a map site has none of these."""
    start, prefix, grid = getattr(site, "start", ()), site.prefix, site.grid
    if site.layout != "tokens":
        if start or prefix or grid:
            raise PlanError(f"plan entry for node {site.node!r}: start, prefix and grid are for layout tokens")
        return
    n = site.size[1]
    if site.size[0] != 1 or not _positive_int(n) or n < 2:
        raise PlanError(f"plan entry for node {site.node!r}: a token sequence has size [1, N] with N > 1")
    if not isinstance(prefix, int) or isinstance(prefix, bool) or not 0 <= prefix < n:
        raise PlanError(f"plan entry for node {site.node!r}: prefix must be 0 to {n - 1}, got {prefix!r}")
    if grid and (not _size(grid) or grid[0] * grid[1] + prefix != n):
        raise PlanError(f"plan entry for node {site.node!r}: grid {list(grid)} and {prefix} prefix tokens do not "
                        f"make its {n} tokens")
    if isinstance(site, PoolEdit):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in start[1:])
        mean = len(start) == 3 and start[0] == "mean" and ints and 0 <= start[1] < start[2] <= n
        token = len(start) == 2 and start[0] == "token" and ints and 0 <= start[1] < n
        if not (mean or token):
            raise PlanError(f"plan pool {site.node!r}: start must be ['mean', first, last] or ['token', index] "
                            f"within its {n} tokens, got {list(start)!r}")


def default_sac_weights(num_heads: int) -> tuple[float, ...]:
    """The paper's weights generalised: heads share 0.3 in proportion to depth, main gets 0.7.

    Two heads give exactly the paper's 0.1, 0.2, 0.7.
    """
    if num_heads == 0:
        return (1.0,)
    total = num_heads * (num_heads + 1) / 2
    return tuple(round((1 - PAPER_MAIN_WEIGHT) * (i + 1) / total, 6) for i in range(num_heads)) + (PAPER_MAIN_WEIGHT,)


