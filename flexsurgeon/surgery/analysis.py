"""Find a traced model's global pools and stage boundaries; change nothing.

Analysis runs the eval-mode graph once on a sample input (like torch.fx's ``ShapeProp``,
writing only ``node.meta``) and decides from shapes, values and graph position, not from
module types or names:

- a *global pool* is a node that turns a ``(B, C, H, W)`` map (``H*W > 1``) into
  ``(B, C)`` or ``(B, C, 1, 1)``; it is an *average* pool when its value equals the mean
  over positions, whatever API computed it (``nn.AdaptiveAvgPool2d``, ``F.avg_pool2d``,
  ``x.mean((2, 3))``, ``x.flatten(2).mean(-1)``, ...);
- a pool is a *gating* pool (squeeze-excite and kin) when something computed from it
  is broadcast back onto a feature map, otherwise a *head* pool;
- a *stage boundary* is the last node at a spatial resolution, before the resolution
  changes, that every path from the input to the output passes through.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from ..errors import AnalysisError
from ..utils import first_line, training_mode
from .blocks import block_stage_ends
from .locate import PoolModule, RewriteSite, TapHook, find_pool_module, find_rewrite_site, find_tap_hook
from .shapes import PoolFinder, is_map
from .tokens import lands_on_tokens, patch_grid, token_shape
from .trace import TracedGraph, downstream, node_shape, trace_model

REPLACEABLE = ("avg", "token")  # pool kinds FlexPool can start out equal to

@dataclass(frozen=True)
class PoolSite:
    """A global reduction found in the graph: over a map's positions, or over a sequence's tokens."""

    node: str  # the node whose output is the pooled tensor
    input: str  # the node holding the (B, C, H, W) map being pooled
    module: str  # module path the node came from
    kind: str  # "avg" or (tokens) "token": replaceable; "other" (max, sum, ...): left alone
    role: str  # "head" or "gating"
    channels: int
    size: tuple[int, int]
    keepdim: bool  # output is (B, C, 1, 1) (or (B, 1, 1, C) for nhwc) rather than (B, C)
    layout: str = "nchw"  # "nhwc": the map is (B, H, W, C), as in channels-last blocks (Swin, MambaOut);
    # "tokens": a (B, N, C) sequence, size (1, N), read as ``start`` says
    start: tuple = ()  # tokens: ("mean", first, last) or ("token", index)
    prefix: int = 0  # tokens: class/register/distillation tokens before the patches
    grid: tuple = ()  # tokens: the patch grid (Hp, Wp), when the patches form one
    pool_module: PoolModule | None = None  # the module that computes exactly this pool, when one does
    rewrite: RewriteSite | None = None  # otherwise: where a rewrite of one module's forward replaces it


@dataclass(frozen=True)
class StageSite:
    """The last node at one spatial resolution that every input-output path crosses."""

    node: str
    module: str
    channels: int
    size: tuple[int, int]
    reduction: int
    hook: TapHook | None = None  # where a forward hook reads this tensor, when a module carries it
    layout: str = "nchw"  # or "tokens": a (B, N, C) sequence, size (1, N), as for PoolSite
    prefix: int = 0
    grid: tuple = ()


@dataclass
class Analysis:
    img_size: tuple[int, int]
    in_chans: int
    pools: list[PoolSite]
    stages: list[StageSite]
    traced: TracedGraph = field(repr=False)
    default_taps: tuple[int, ...] = ()  # stages that get SAC heads by default, when not the two before the last
    token_grids: dict = field(default_factory=dict)  # token count -> (prefix tokens, patch grid), as read

    @property
    def head_pools(self) -> list[PoolSite]:
        return [p for p in self.pools if p.role == "head" and p.kind in REPLACEABLE]

    def to_dict(self) -> dict:
        return {
            "img_size": list(self.img_size),
            "in_chans": self.in_chans,
            "pools": [asdict(p) for p in self.pools],
            "stages": [asdict(s) for s in self.stages],
        }


def _spatial(shape, img_size) -> tuple[int, int] | None:
    """(H, W) of an NCHW feature map, or of a channels-last (B, H, W, C) one (Swin, MambaOut
    stages); None when ``shape`` is neither. NCHW is tried first."""
    return _map(shape, img_size)[0]


def _map(shape, img_size) -> tuple[tuple[int, int] | None, str]:
    """``((H, W), layout)`` of a feature map, ``(None, "")`` when ``shape`` is not one."""
    if shape is None or len(shape) != 4:
        return None, ""
    h, w = int(shape[2]), int(shape[3])
    if h * w == 1 or is_map(h, w, img_size):
        return (h, w), "nchw"
    if is_map(int(shape[1]), int(shape[2]), img_size):
        return (int(shape[1]), int(shape[2])), "nhwc"
    return None, ""


def _broadcasts_back(node: fx.Node, img_size) -> bool:
    """True when a value computed from ``node`` lands on a feature map (NCHW or NHWC)."""
    for user in downstream(node):
        shape = node_shape(user)
        if shape is not None and len(shape) == 4 and (
                is_map(int(shape[2]), int(shape[3]), img_size) or is_map(int(shape[1]), int(shape[2]), img_size)):
            return True
    return False


def cut_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Tensor nodes that every path from the input to the output passes through.

    In a topological order a node is on every path exactly when no data edge jumps over
    it, which one sweep over the edges decides.
    """
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if not placeholders or not outputs:
        return []

    def data_users(n):  # users that carry tensors (or tuples of them, like split); not shape arithmetic
        return [u for u in n.users if u.op == "output" or u.meta.get("tensor_meta") is not None]

    forward = set()
    todo = [placeholders[0]]
    while todo:
        n = todo.pop()
        if n not in forward:
            forward.add(n)
            todo.extend(data_users(n))
    backward = set()
    todo = list(outputs)
    while todo:
        n = todo.pop()
        if n not in backward:
            backward.add(n)
            todo.extend(a for a in n.all_input_nodes if a in forward)
    live = [n for n in nodes if n in forward and n in backward]
    position = {n: i for i, n in enumerate(live)}
    reach = [0] * len(live)  # reach[i]: furthest target of an edge leaving a node at or before i
    furthest = 0
    for i, n in enumerate(live):
        for u in data_users(n):
            if u in position:
                furthest = max(furthest, position[u])
        reach[i] = furthest
    return [n for i, n in enumerate(live) if i == 0 or reach[i - 1] <= i]


def _find_stages(cuts: list[fx.Node], traced: TracedGraph, img_size, stop: str | None,
                 model: nn.Module) -> list[StageSite]:
    qualnames = traced.qualnames
    groups: list[list[fx.Node]] = []
    for n in cuts:
        if n.op == "placeholder":
            continue
        size = _spatial(node_shape(n), img_size)
        if size is None:
            continue
        if groups and _spatial(node_shape(groups[-1][-1]), img_size) == size:
            groups[-1].append(n)
        else:
            groups.append([n])
        if n.name == stop:
            break
    stages = []
    for group, following in zip(groups, groups[1:] + [None]):
        # The block that changes the resolution may start at the old one (an expansion
        # conv before a strided depthwise conv): the stage ends before that block.
        if following is not None:
            block = _straddling_block(qualnames.get(following[0].name, ""), group, qualnames, model)
            if block:
                group = [n for n in group if not qualnames.get(n.name, "").startswith(block + ".")] or group
        size, _ = _map(node_shape(group[-1]), img_size)
        if size[0] * size[1] > 1:
            stages.append(_map_stage(traced, group[-1], img_size))
    return stages


def _map_stage(traced: TracedGraph, node: fx.Node, img_size) -> StageSite:
    shape = node_shape(node)
    size, layout = _map(shape, img_size)
    return StageSite(node=node.name, module=traced.qualnames.get(node.name, ""),
                     channels=int(shape[3] if layout == "nhwc" else shape[1]), size=size,
                     reduction=max(1, round(img_size[0] / size[0])), hook=find_tap_hook(traced, node.name),
                     layout=layout)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _straddling_block(first_reduced: str, group: list[fx.Node], qualnames: dict, model: nn.Module) -> str:
    """The innermost block (not a mere container) holding the first node at the new
    resolution and nodes of the old one; empty when the resolution drops between blocks."""
    parts = first_reduced.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        block = ".".join(parts[:depth])
        try:
            module = model.get_submodule(block)
        except AttributeError:
            continue
        if type(module) in _CONTAINERS:  # subclasses (e.g. DenseNet transitions) are blocks
            continue
        if any(qualnames.get(n.name, "").startswith(block + ".") for n in group):
            return block
    return ""


SAMPLE_BATCH = 2  # images in the sample that gives every node its shape


def _per_image(cuts: list[fx.Node]) -> list[fx.Node]:
    """The cut nodes whose first dimension is the sample's batch: a tensor that folds positions
    into the batch (TNT's pixel stream, ``(B * patches, 16, C)``) holds no one image's features,
    so no SAC head can read it."""
    return [n for n in cuts if (shape := node_shape(n)) is not None and len(shape) > 0
            and int(shape[0]) == SAMPLE_BATCH]


def _sample(img_size, in_chans: int) -> torch.Tensor:
    return torch.randn(SAMPLE_BATCH, in_chans, *img_size, generator=torch.Generator().manual_seed(0))


def _propagate(gm: fx.GraphModule, model: nn.Module, img_size, in_chans: int) -> PoolFinder:
    """Run the eval graph once on a seeded sample (no grad); the model's mode is restored."""
    finder = PoolFinder(gm, img_size)
    with training_mode(model, False), torch.no_grad():
        finder.run(_sample(img_size, in_chans))
    return finder


def _own_error(model: nn.Module, img_size, in_chans: int) -> Exception | None:
    """The model's own error on the sample, run as itself: a message the model builds while it
    is traced names torch.fx's stand-ins (``got Proxy(getitem_2)``) where this one has the values."""
    try:
        with training_mode(model, False), torch.no_grad():
            model(_sample(img_size, in_chans))
    except Exception as exc:
        return exc
    return None


def _built_for(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model declares: timm's ``pretrained_cfg``, torchvision ViT's ``image_size``."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return int(size[1]), int(size[2])
    size = getattr(model, "image_size", None)
    return (size, size) if isinstance(size, int) else None


def analyse(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3,
            traced: TracedGraph | None = None, replace_gating: bool = False) -> Analysis:
    """Trace ``model`` in eval mode and find its pools and stages at ``img_size``; for the
    head pools (and the gating ones with ``replace_gating``), how each can be replaced.

    The model's parameters, buffers and train/eval mode are left as they were.
    """
    traced = traced or trace_model(model, training=False)
    gm = fx.GraphModule(model, traced.graph)
    # A global pool pools the whole map at every input size, while a local window (a 3x3,
    # stride-2 pool in an Inception reduction block) can cover all of a small map and look
    # global. So pools are also found at twice the size, and only those seen at both count.
    # Models that run at one size only skip this. This run comes first: the run at img_size
    # then writes the shapes analysis reports.
    try:
        larger = set(_propagate(gm, model, (2 * img_size[0], 2 * img_size[1]), in_chans).candidates)
    except Exception:  # "not at this size"; the run at img_size reports real errors
        larger = None
    try:
        finder = _propagate(gm, model, img_size, in_chans)
    except Exception as exc:
        message = first_line(_own_error(model, img_size, in_chans) or exc)
        built = _built_for(model)
        hint = (f"the input size may be too small for this network, or not one it accepts (it was built for "
                f"{built[0]}x{built[1]}): try --img-size {built[0]}" if built and built != tuple(img_size) else
                "the input size may be too small for this network: try a larger --img-size")
        raise AnalysisError(f"the model fails on a {in_chans}x{img_size[0]}x{img_size[1]} input ({message}); {hint}") \
            from exc

    nodes = {n.name: n for n in traced.graph.nodes}
    candidates = finder.candidates
    if larger is not None:  # a window that happens to cover a small map is no global pool
        candidates = {k: v for k, v in candidates.items() if k in larger}
    pools = []
    for name, (source, kind, keepdim, layout) in candidates.items():
        shape = node_shape(nodes[source])
        if layout == "tokens":
            prefix, grid = patch_grid(model, int(shape[1]), img_size)
            pools.append(PoolSite(
                node=name, input=source, module=traced.qualnames.get(name, ""), kind=kind, channels=int(shape[2]),
                role="gating" if lands_on_tokens(nodes[name], int(shape[2]), candidates) else "head",
                size=(1, int(shape[1])), keepdim=False, layout=layout, start=finder.token_starts.get(name, ()),
                prefix=prefix, grid=grid))
        else:
            if layout == "nhwc":
                shape = (shape[0], shape[3], shape[1], shape[2])
            pools.append(PoolSite(
                node=name, input=source, module=traced.qualnames.get(name, ""), kind=kind,
                role="gating" if _broadcasts_back(nodes[name], img_size) else "head",
                channels=int(shape[1]), size=(int(shape[2]), int(shape[3])), keepdim=keepdim, layout=layout,
            ))
        if kind in REPLACEABLE and (pools[-1].role == "head" or replace_gating):
            pools[-1] = _replacement(model, traced, pools[-1], node_shape(nodes[source]), img_size, in_chans)
    head = [p for p in pools if p.role == "head"]
    stop = head[-1].input if head else None
    cuts = _per_image(cut_nodes(traced.graph))

    def hook_of(name):
        return find_tap_hook(traced, name)

    if head and head[-1].layout == "tokens":
        grids = {t[0]: patch_grid(model, t[0], img_size) for t in map(token_shape, map(node_shape, cuts)) if t}
        ends, default = block_stage_ends(cuts, stop, hook_of, key=lambda n: (token_shape(node_shape(n)) or (None,))[0])
        stages = [_token_stage(traced, n, grids) for n in ends]
        if not default and ends:  # hierarchical: the map stages before the first token stage come first
            order = {n.name: i for i, n in enumerate(cuts)}
            stages = [s for s in _find_stages(cuts, traced, img_size, ends[0].name, model)
                      if order.get(s.node, 0) < order[ends[0].name]] + stages
    else:
        stages, default, grids = _find_stages(cuts, traced, img_size, stop, model), (), {}
        if len(stages) < 2:  # one map size throughout (ConvMixer, SAM's ViT): its blocks are its stages
            ends, default = block_stage_ends(cuts, stop, hook_of, key=lambda n: _spatial(node_shape(n), img_size))
            stages = [_map_stage(traced, n, img_size) for n in ends] if default else stages
    return Analysis(img_size=tuple(img_size), in_chans=in_chans, pools=pools, stages=stages, traced=traced,
                    default_taps=default, token_grids=grids)


def _token_stage(traced: TracedGraph, node: fx.Node, grids: dict) -> StageSite:
    tokens, channels = token_shape(node_shape(node))
    prefix, grid = grids.get(tokens, (0, ()))
    return StageSite(node=node.name, module=traced.qualnames.get(node.name, ""), channels=channels, size=(1, tokens),
                     reduction=1, hook=find_tap_hook(traced, node.name), layout="tokens", prefix=prefix, grid=grid)


def _replacement(model, traced, site: PoolSite, shape, img_size, in_chans) -> PoolSite:
    """``site`` with how it can be replaced: its module in place, or else by rewriting the
    method that holds it."""
    found = find_pool_module(model, traced, site.node, site.input, shape, site.layout)
    if found is not None:
        return dataclasses.replace(site, pool_module=found)
    return dataclasses.replace(site, rewrite=find_rewrite_site(model, traced, site.node, img_size, in_chans,
                                                               shape, site.layout, site.kind, site.start))


def find_tap(analysis: Analysis, name: str) -> StageSite:
    """Resolve a user-given tap (a node name or a module path) to a site on the graph."""
    graph = analysis.traced.graph
    qualnames = analysis.traced.qualnames
    nodes = [n for n in graph.nodes if node_shape(n) is not None]
    match = next((n for n in nodes if n.name == name), None)
    if match is None:  # a module path: its last node
        inside = [n for n in nodes if qualnames.get(n.name, "") == name
                  or qualnames.get(n.name, "").startswith(name + ".")]
        match = inside[-1] if inside else None
    if match is None:
        choices = sorted({n.name for n in nodes} | {qualnames.get(n.name, "") for n in nodes} - {""})
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `flexsurgeon inspect` to list stages"
        raise AnalysisError(f"no node or module named '{name}' in the traced model{hint}")
    shape = node_shape(match)
    if token_shape(shape) is not None:
        return _token_stage(analysis.traced, match, analysis.token_grids)
    size, layout = _map(shape, analysis.img_size)
    if size is None or size[0] * size[1] <= 1:
        raise AnalysisError(f"'{name}' is not a feature map or a token sequence (its shape is {list(shape)}); "
                            "a SAC head needs a (B, C, H, W) tap with H*W > 1, or (B, N, C) tokens")
    return StageSite(node=match.name, module=qualnames.get(match.name, ""),
                     channels=int(shape[3] if layout == "nhwc" else shape[1]), size=size,
                     reduction=max(1, round(analysis.img_size[0] / size[0])),
                     hook=find_tap_hook(analysis.traced, match.name), layout=layout)
