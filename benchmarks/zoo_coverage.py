"""Zoo coverage: try flexsurgeon on every timm CNN and torchvision classifier, write a table.

Each model is built at random init (no network) and converted at a small input size
chosen from its config (a 2x2 final map where the network allows it, larger sizes when
the small one is refused for its size). The outcome is one of:

- ``preserved``: converted; the eval output equals the source's (1e-5 of the output's
  scale, float32) and FlexPool's weights get a gradient from the output (the new pool is
  on the output's path);
- ``refused``: flexsurgeon raised a ``FlexSurgeonError``; its one-line message is the reason;
- ``timm-untraceable``: our trace failed and timm's own ``get_graph_node_names`` fails too;
- ``wrong``: converted but the output differs, the pool is dead or a SAC head does not give
  one row of logits per image, flexsurgeon raised an exception that is not a
  ``FlexSurgeonError`` (a bug of ours), or our trace failed where timm's succeeds;
- ``skipped``: too large (``--max-params``), timed out, does not build, or its random-init
  output is not finite (nothing to compare); ``not-walked``: excluded by the filter.

By default timm models are walked when timm's config declares a ``pool_size`` (a spatial
final feature map); the others (mostly transformers that pool tokens) are listed as
not walked, and ``--all`` walks them too.

The walk calls the Python API (fast). The one-per-family sample (``--quick``), and any list
with ``--via-cli``, also runs each walked model through the command a user runs, in a
subprocess with the walk's time limit, at the input size the API walk settled on::

    python -m flexsurgeon convert MODEL --random-init --img-size HxW --num-classes 5 -o TMP/out
    python -m flexsurgeon inspect MODEL --img-size HxW --num-classes 5

in a hermetic environment (``HF_HUB_OFFLINE=1``, proxies pointed at a closed local port,
empty Hub/torch caches, CUDA hidden). Its result (the record's ``cli`` field, the table's
CLI column) is ``preserved`` when the API walk preserved the model and: convert exits 0,
prints the ``converted ...`` line, the costs table and the ``saved ...`` line, no traceback
on stderr, the folder loads with ``flexsurgeon.load`` and with
``timm.create_model('local-dir:...', pretrained=True)`` (the two agree), no lock file is
left, and inspect exits 0; ``refused`` when the API walk refused the model and convert
exits 1 with exactly one ``Error:`` line, no traceback, no folder (nor lock) left behind,
and inspect exits 1; ``failed`` otherwise (the reason says why, in one line); ``skipped``
when a command timed out. Models the API walk skipped are not run through the CLI.

    python benchmarks/zoo_coverage.py --quick           # one model per timm module / torchvision family, API + CLI
    python benchmarks/zoo_coverage.py --budget-min 60   # the whole zoo, stopping after an hour
    python benchmarks/zoo_coverage.py --filter 'resnet*' --filter 'tv:*'
    python benchmarks/zoo_coverage.py --refused-in benchmarks/zoo_coverage_full.jsonl  # what an earlier walk refused

Models whose input size is fixed when built (a ViT's position embeddings) are built for each
size tried, as ``convert --img-size`` builds them.

Results stream to a JSON-lines file (``--records``); ``--resume`` skips models already
in it, so a long walk can be continued. The table is written to ``--out``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import flexsurgeon  # noqa: E402
from flexsurgeon.checkpoints.io import ARCHITECTURE
from flexsurgeon.errors import AnalysisError, FlexSurgeonError, TraceError
from flexsurgeon.surgery.apply import new_parameter_names
from flexsurgeon.surgery.convert import PRESERVATION_TOLERANCE
from flexsurgeon.surgery.sources import build_source, parse_source, spec_at_size

NUM_CLASSES = 5
SMALL_TOKEN_SIZE = (64, 64)  # a ViT's 4x4 patch grid: tried before the native size of a model built for its size
HERE = Path(__file__).resolve().parent
OUTCOMES = ("preserved", "refused", "timm-untraceable", "wrong", "skipped", "not-walked")
CLI_RESULTS = ("preserved", "refused", "failed", "skipped")
# Refusals that a larger input may cure; anything else is final at the first size.
_SIZE_PROBLEMS = ("no global average pool", "fails on a", "is not an average", "not a spatial")


class _Timeout(BaseException):
    """Not an Exception: flexsurgeon's own ``except Exception`` (analysis retries a size it
    cannot run) would swallow it, and the one-shot alarm would never fire again."""


@contextlib.contextmanager
def _time_limit(seconds: int):
    def fire(signum, frame):
        raise _Timeout(f"timed out after {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


# ---------------------------------------------------------------- which models, at which sizes


def _timm_cfg(name: str):
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def _timm_module(name: str) -> str:
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "?")


def _tv_family(name: str) -> str:
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


def _timm_sizes(name: str) -> list[tuple[int, int]]:
    cfg = _timm_cfg(name)
    native = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
    pool = getattr(cfg, "pool_size", None) if cfg is not None else None
    stride = max(1, round(native[0] / pool[0])) if pool and pool[0] else 32
    minimum = max(getattr(cfg, "min_input_size", None) or (0, 0, 0))
    return _ladder(native, stride, minimum, bool(getattr(cfg, "fixed_input_size", False)))


def _tv_sizes(name: str) -> list[tuple[int, int]]:
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
        cfg = _timm_cfg(n)
        return (max(cfg.input_size[1:]) if cfg is not None else 224, len(n), n)

    short = sorted(real, key=cheap_key)[:shortlist]
    counts = {n: _param_count_m(parse_source(n, num_classes=NUM_CLASSES)) for n in short}
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
            cfg = _timm_cfg(name)
            if not args.all and (cfg is None or not getattr(cfg, "pool_size", None)):
                not_walked[name] = ("timm's config declares no pool_size (mostly transformers that pool tokens); "
                                    "--all walks it")
                continue
            by_module[_timm_module(name)].append(name)
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
                families[_tv_family(name)].append(name)
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


# ---------------------------------------------------------------- one model


def _param_count_m(spec) -> float | None:
    """Millions of parameters, counted on the meta device (nothing allocated)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_source(spec, "random")
        return sum(p.numel() for p in model.parameters()) / 1e6
    except Exception:  # noqa: BLE001 - some builders need real tensors; count after building
        return None


def _timm_traces(model) -> tuple[bool, str]:
    from timm.models import get_graph_node_names

    try:
        get_graph_node_names(model)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means timm cannot trace it either
        return False, _first_line(exc)


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _verify(source, converted, size) -> str | None:
    """None when the conversion is right; else why it is wrong."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    expected, got = _eval(source, x), _eval(converted, x)
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
        return f"outputs are {type(expected).__name__} / {type(got).__name__}, not tensors"
    if expected.shape != got.shape:
        return f"output shape {tuple(got.shape)} != source's {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    if not diff <= PRESERVATION_TOLERANCE * scale:
        return f"eval output differs from the source's by {diff:.3g} (scale {scale:.3g})"
    converted.zero_grad(set_to_none=True)
    # Only FlexPool's weights take gradients here: autograd then keeps no backbone
    # activations, so the check costs a forward pass even for the largest models
    # (with every parameter training, maxvit_xlarge_tf_512 ran out of 24 GB).
    trainable = {p: p.requires_grad for p in converted.parameters()}
    for p in trainable:
        p.requires_grad_(False)
    pools = {n: converted.get_parameter(n) for n in new_parameter_names(converted) if not n.startswith("sac_heads.")}
    for p in pools.values():
        p.requires_grad_(True)
    try:
        converted(x).float().square().sum().backward()
        # None: autograd never reached the weight. (A zero gradient is reachable: a random-init
        # LeViT's last map is constant over positions, where every weighting gives the same mean.)
        dead = [n for n, p in pools.items() if p.grad is None]
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    converted.zero_grad(set_to_none=True)
    if dead:
        return f"FlexPool {dead[0]} gets no gradient from the output"
    return None


def _check_sac(converted, size) -> str | None:
    """None when each default SAC head gives one row of logits per image, as the main output
    does; else which head does not."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    converted.eval()
    with torch.no_grad():
        out, heads = flexsurgeon.forward_with_sac(converted, x)
    for tap, head in zip(converted.flexsurgeon_plan.sac, heads):
        if tuple(head.shape) != tuple(out.shape):
            return f"the SAC head on {tap.module} gives {tuple(head.shape)}, not {tuple(out.shape)}"
    return None


METHODS = ("in place", "head rewrite", "graph rewrite")


def _method(plan) -> str:
    """How the pool was replaced: "in place" (the pool module swapped on its parent), "head
    rewrite" (only timm's ``forward_head`` regenerated) or "graph rewrite" (a module's forward)."""
    rewrites = [p for p in plan.pools if p.replacement == "graph_rewrite"]
    if not rewrites:
        return "in place"
    return "head rewrite" if all(p.forward == "forward_head" for p in rewrites) else "graph rewrite"


def _reduction(plan) -> str:
    """What the source's pool was: "spatial mean" (a CNN), "token mean" or "class token"."""
    pool = plan.pools[0]
    if pool.layout != "tokens":
        return "spatial mean"
    return "token mean" if pool.start and pool.start[0] == "mean" else "class token"


def check_model(label: str, args) -> dict:
    start = time.time()
    library = "torchvision" if label.startswith("tv:") else "timm"
    record = {"model": label, "source": library,
              "family": _tv_family(label[3:]) if library == "torchvision" else _timm_module(label),
              "outcome": None, "reason": "", "img": None, "pool": None, "params_m": None}

    def done(outcome, reason=""):
        record.update(outcome=outcome, reason=reason, seconds=round(time.time() - start, 1))
        return record

    spec = parse_source(label, num_classes=NUM_CLASSES)
    params = _param_count_m(spec)
    if params is not None and params > args.max_params:
        record["params_m"] = round(params, 1)
        return done("skipped", f"{params:.0f}M parameters > --max-params {args.max_params:g}M")
    try:
        with _time_limit(args.timeout):
            torch.manual_seed(0)
            try:
                source = build_source(spec, "random")
            except FlexSurgeonError:
                raise
            except Exception as exc:  # noqa: BLE001 - the library's own builder failed
                return done("skipped", f"does not build: {_first_line(exc)}")
            params = sum(p.numel() for p in source.parameters()) / 1e6
            record["params_m"] = round(params, 1)
            if params > args.max_params:
                return done("skipped", f"{params:.0f}M parameters > --max-params {args.max_params:g}M")
            sizes = _tv_sizes(label[3:]) if library == "torchvision" else _timm_sizes(label)
            native = sizes[-2] if len(sizes) > 1 else sizes[0]
            if len(sizes) == 1 and spec_at_size(spec, SMALL_TOKEN_SIZE) != spec:
                sizes = [SMALL_TOKEN_SIZE, *sizes]  # a fixed-size model built for its input size: try a small one
            refusals = {}
            as_built = source
            for size in sizes:
                record["img"] = f"{size[0]}x{size[1]}"
                sized = spec_at_size(spec, size)  # a ViT is built for its input size, as `convert --img-size` does
                source = as_built  # not the one an earlier size built
                if sized != spec:
                    torch.manual_seed(0)
                    try:
                        source = build_source(sized, "random")
                    except Exception as exc:  # noqa: BLE001 - the builder's own limit on sizes: try the next
                        refusals[size] = f"does not build at {size[0]}x{size[1]}: {_first_line(exc)}"
                        continue
                try:  # conversion changes the model it is given: the source stays as it was, to compare
                    converted = flexsurgeon.convert(copy.deepcopy(source), img_size=size, num_classes=NUM_CLASSES)
                except TraceError as exc:
                    if library == "timm":
                        traces, why = _timm_traces(source)
                        if not traces:
                            return done("timm-untraceable", why)
                        return done("wrong", f"timm traces it but flexsurgeon does not: {_first_line(exc)}")
                    return done("refused", _first_line(exc))
                except AnalysisError as exc:
                    message = _first_line(exc)
                    if message.startswith("the converted model's output differs"):
                        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
                        if not torch.isfinite(_eval(source, x)).all():
                            return done("skipped", "the source's random-init output is not finite")
                        return done("wrong", message)
                    refusals[size] = message
                    if not any(p in message for p in _SIZE_PROBLEMS):
                        break
                    continue
                except FlexSurgeonError as exc:
                    return done("refused", _first_line(exc))
                problem = _verify(source, converted, size) or _check_sac(converted, size)
                plan = converted.flexsurgeon_plan
                record["sac_heads"] = len(plan.sac)
                record["pool"] = "+".join(f"{p.size[0]}x{p.size[1]}" for p in plan.pools)
                # the record field keeps its historic name "method" (earlier JSONL files use it)
                record["reduction"] = _reduction(plan)
                record["method"] = _method(plan)
                if type(converted) is not type(source):
                    return done("wrong", f"the converted model is a {type(converted).__name__}, not a "
                                         f"{type(source).__name__}")
                if problem:
                    return done("wrong", problem)
                if args.roundtrip:
                    problem = _round_trip(label, size, source)
                    if problem:
                        return done("wrong", problem)
                return done("preserved", "")
            size = native if native in refusals else list(refusals)[-1]
            record["img"] = f"{size[0]}x{size[1]}"
            tried = ", ".join(f"{s[0]}" for s in refusals)
            return done("refused", f"{refusals[size]} [tried {tried}]")
    except _Timeout as exc:
        return done("skipped", str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is a flexsurgeon bug
        return done("wrong", f"unexpected {type(exc).__name__}: {_first_line(exc)}")


def _round_trip(label, size, source) -> str | None:
    """Convert by name, save, load: the loaded model's output must equal the saved one's."""
    converted = flexsurgeon.convert(label, img_size=size, num_classes=NUM_CLASSES, weights="random")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = flexsurgeon.load(flexsurgeon.save(converted, Path(tmp) / "ckpt"))
    expected, got = _eval(converted, x), _eval(loaded, x)
    if not torch.allclose(got, expected, rtol=0, atol=PRESERVATION_TOLERANCE * max(1.0, expected.abs().max().item())):
        return "the loaded checkpoint's output differs from the saved model's"
    return None


# ---------------------------------------------------------------- one model, through the command line

_TRACEBACK = "Traceback (most recent call last)"
_COSTS_HEADER = re.compile(r"^\s+model\s+parameters\s+multiply-adds\b")
_NO_NETWORK = "http://127.0.0.1:9"  # the discard port: nothing listens, so a download fails at once


def _cli_env(home: Path) -> dict[str, str]:
    """The environment of the CLI subprocesses: offline, no GPU, empty caches, this checkout's package."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("no_proxy", "hf_token", "hugging_face_hub_token", "pythonstartup")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               CUDA_VISIBLE_DEVICES="", HF_HOME=str(home / "hf"), TORCH_HOME=str(home / "torch"),
               XDG_CACHE_HOME=str(home / "cache"), OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join(filter(None, (str(Path(flexsurgeon.__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH")))))
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = _NO_NETWORK
    return env


def _run_cli(argv: list[str], env: dict, cwd: Path, timeout: int) -> tuple[int | None, str, str]:
    """(exit code or None on a timeout, stdout, stderr) of ``python -m flexsurgeon ARGV``."""
    try:
        done = subprocess.run([sys.executable, "-m", "flexsurgeon", *argv], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return None, text(exc.stdout), text(exc.stderr)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _load_checks(folder: Path, size: tuple[int, int], timeout: int) -> tuple[bool, bool | None, str]:
    """(flexsurgeon.load works, timm's local-dir works (None: not tried), why not): both give an eval
    output of (2, NUM_CLASSES) for the same input, and the two outputs agree."""
    import timm

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    try:
        with _time_limit(timeout):
            ours = _eval(flexsurgeon.load(folder), x)
            if not isinstance(ours, torch.Tensor) or tuple(ours.shape) != (2, NUM_CLASSES):
                shape = tuple(ours.shape) if isinstance(ours, torch.Tensor) else type(ours).__name__
                return False, None, f"flexsurgeon.load's model gives {shape}, not (2, {NUM_CLASSES})"
    except (Exception, _Timeout) as exc:  # noqa: BLE001 - any failure to load is the finding
        return False, None, f"flexsurgeon.load fails: {type(exc).__name__}: {_first_line(exc)}"
    try:
        with _time_limit(timeout):
            theirs = _eval(timm.create_model(f"local-dir:{folder}", pretrained=True), x)
    except (Exception, _Timeout) as exc:  # noqa: BLE001
        return True, False, f"timm local-dir fails: {type(exc).__name__}: {_first_line(exc)}"
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape or not torch.allclose(
            theirs, ours, rtol=0, atol=PRESERVATION_TOLERANCE * max(1.0, ours.abs().max().item()), equal_nan=True):
        return True, False, "timm local-dir's model gives another output than flexsurgeon.load's"
    return True, True, ""


def check_cli(record: dict, args) -> dict:
    """Run the walked model through ``flexsurgeon convert`` and ``inspect`` as a user would (see the
    module's docstring); the result for ``record['cli']``."""
    start = time.time()
    label, api = record["model"], record["outcome"]
    if api in ("skipped", "not-walked") or not record.get("img"):
        return {"result": None, "reason": "not run: the API walk tried no input size"}
    size = tuple(int(v) for v in record["img"].split("x"))
    img = str(size[0]) if size[0] == size[1] else record["img"]
    common = ["--img-size", img, "--num-classes", str(NUM_CLASSES)]
    cli = {"result": None, "reason": "", "convert_rc": None, "converted_line": False, "costs_table": False,
           "saved_line": False, "stderr_clean": None, "error_lines": None, "folder": None, "lock_left": None,
           "loads": None, "timm_loads": None, "inspect_rc": None}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zoo_cli_") as tmp:
        tmp = Path(tmp)
        out, home = tmp / "out", tmp / "home"
        home.mkdir()
        env = _cli_env(home)
        rc, stdout, stderr = _run_cli(["convert", label, "--random-init", *common, "-o", str(out)], env, tmp,
                                      args.timeout)
        lines = stdout.splitlines()
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        cli.update(convert_rc=rc, converted_line=any(line.startswith(f"converted {label}:") for line in lines),
                   costs_table=any(_COSTS_HEADER.match(line) for line in lines)
                   and not any("costs not measured" in line for line in lines),
                   saved_line=any(line.startswith(f"saved {out}/") for line in lines),
                   stderr_clean=_TRACEBACK not in stderr, error_lines=len(errors),
                   folder=out.is_dir(), lock_left=(tmp / ".out.lock").exists())
        if rc is None:
            cli.update(result="skipped", reason=f"convert timed out after {args.timeout}s",
                       seconds=round(time.time() - start, 1))
            return cli
        if not cli["stderr_clean"]:
            problems.append(f"convert printed a traceback: {_last_line(stderr)}")
        if cli["lock_left"]:
            problems.append("convert left its lock file behind")
        if rc == 0:
            if api != "preserved":
                problems.append(f"convert exits 0 where the API walk says {api}")
            missing = [what for what, key in (("the 'converted ...' line", "converted_line"),
                                              ("the costs table", "costs_table"), ("the 'saved ...' line",
                                                                                  "saved_line")) if not cli[key]]
            if missing:
                warning = next((line.strip() for line in lines if "costs not measured" in line), "")
                problems.append("convert's output lacks " + ", ".join(missing) + (f" ({warning})" if warning else ""))
            if errors:
                problems.append(f"convert exits 0 but printed {errors[0]}")
            if not cli["folder"]:
                problems.append("convert exits 0 but wrote no folder")
            else:
                cli["loads"], cli["timm_loads"], why = _load_checks(out, size, args.timeout)
                if why:
                    problems.append(why)
        elif rc == 1:
            if api == "preserved":
                problems.append("convert refuses where the API walk preserved: "
                                + (errors[0] if errors else _last_line(stderr) or "no message"))
            if len(errors) != 1:
                problems.append(f"convert exits 1 with {len(errors)} 'Error:' lines, not one"
                                + (f": {_last_line(stderr)}" if not errors else ""))
            elif errors[0].startswith("Error: unexpected "):  # friendly_errors' line for an error not ours
                problems.append(f"convert fails with an error that is not flexsurgeon's: {errors[0]}")
            if cli["folder"]:
                problems.append("convert exits 1 but left the output folder behind")
        else:
            problems.append(f"convert exits {rc}: " + (_last_line(stderr) or "no message"))
        irc, _, istderr = _run_cli(["inspect", label, *common], env, tmp, args.timeout)
        cli["inspect_rc"] = irc
        if irc is None:
            problems.append(f"inspect timed out after {args.timeout}s")
        else:
            if _TRACEBACK in istderr:
                cli["stderr_clean"] = False
                problems.append(f"inspect printed a traceback: {_last_line(istderr)}")
            expected = 0 if rc == 0 else 1
            if irc != expected:
                problems.append(f"inspect exits {irc} where convert exits {rc}"
                                + (f": {_last_line(istderr)}" if irc not in (0, 1) or istderr.strip() else ""))
    if problems:
        cli.update(result="failed", reason=_clip("; ".join(problems), 400))
    elif rc == 0:
        cli.update(result="preserved")
    else:
        cli.update(result="refused", reason=errors[0][len("Error:"):].strip())
    cli["seconds"] = round(time.time() - start, 1)
    return cli


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- report


def _versions() -> str:
    import timm
    import torchvision

    return (f"torch {torch.__version__}, timm {timm.__version__}, torchvision {torchvision.__version__}, "
            f"flexsurgeon {flexsurgeon.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} threads")


def _reason_key(reason: str) -> str:
    """A refusal reason with model-specific names and numbers taken out, to count kinds of reasons."""
    key = re.sub(r"'[^']*'", "'…'", reason)
    key = re.sub(r"\[tried [^\]]*\]", "", key)
    key = re.sub(r"(?<![\w.])(?!1x1\b)\d+(\.\d+)?(e[-+]?\d+)?(x\d+)?", "N", key)
    key = re.sub(r"torch\.fx cannot trace \w+", "torch.fx cannot trace X", key)
    key = re.sub(r"\(\w+\)", "(…)", key)
    return key.strip()[:160]


def summarize(records: list[dict]) -> dict:
    counts = {src: collections.Counter(r["outcome"] for r in records if r["source"] == src)
              for src in ("timm", "torchvision")}
    reasons = collections.Counter((r["outcome"], _reason_key(r["reason"])) for r in records
                                  if r["outcome"] in ("refused", "wrong", "timm-untraceable", "skipped"))
    methods = {src: collections.Counter(r.get("method") for r in records
                                        if r["source"] == src and r["outcome"] == "preserved")
               for src in ("timm", "torchvision")}
    checked = [r for r in records if (r.get("cli") or {}).get("result")]
    cli = {src: collections.Counter(r["cli"]["result"] for r in checked if r["source"] == src)
           for src in ("timm", "torchvision")}
    cli_reasons = collections.Counter(_reason_key(r["cli"]["reason"]) for r in checked
                                      if r["cli"]["result"] in ("failed", "skipped"))
    # the finding the CLI check exists for: converted through the API, not through the command
    api_only = sorted(r["model"] for r in checked if r["outcome"] == "preserved" and r["cli"]["result"] != "preserved")
    return {"counts": counts, "reasons": reasons, "methods": methods, "cli": cli, "cli_reasons": cli_reasons,
            "api_only": api_only}


def write_table(records: list[dict], not_walked: dict[str, str], path: Path, command: str,
                complete: bool) -> None:
    walked = {r["model"] for r in records}
    rows = records + [{"model": n, "source": "timm", "family": _timm_module(n), "outcome": "not-walked",
                       "reason": why, "img": None, "pool": None, "params_m": None, "seconds": None}
                      for n, why in not_walked.items() if n not in walked]
    summary = summarize(rows)
    lines = [
        "# Zoo coverage",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} "
        f"({sum(_seconds(r) for r in records) / 60:.0f} min of per-model time; {_versions()}).",
        "" if complete else "**Partial walk**: the time budget or `--limit` stopped it before every model was tried.",
        "",
        "Every model is built at random init, converted at a small input size (the first of a 2x2 final map, "
        "4x4, the native size and 1.3x native that flexsurgeon accepts), and checked: eval output equal to the "
        f"source's (max abs diff <= {PRESERVATION_TOLERANCE:g} x max(1, output scale)) and FlexPool on the "
        "output's path. See `benchmarks/zoo_coverage.py` for the outcomes.",
        "",
        "| source | " + " | ".join(OUTCOMES) + " | total |",
        "|---|" + "---|" * (len(OUTCOMES) + 1),
    ]
    for src, counter in summary["counts"].items():
        if counter:
            lines.append(f"| {src} | " + " | ".join(str(counter.get(o, 0)) for o in OUTCOMES)
                         + f" | {sum(counter.values())} |")
    lines += ["", "How the preserved models were converted: `in place` (the pool module swapped on its parent) or "
              "`head rewrite` (only timm's `forward_head`, which holds the pool as code, regenerated) or "
              "`graph rewrite` (the forward of the one module holding a pool written as code regenerated); "
              "all keep the model's class.", "", "| source | " + " | ".join(METHODS) + " |", "|---|---|---|---|"]
    for src, counter in summary["methods"].items():
        if counter:
            lines.append(f"| {src} | " + " | ".join(str(counter.get(m, 0)) for m in METHODS) + " |")
    reductions = collections.Counter((r.get("reduction") or "spatial mean", r.get("method")) for r in records
                                     if r["outcome"] == "preserved" and r["source"] == "timm")
    if any(k[0] != "spatial mean" for k in reductions):
        lines += ["", "The source's reduction in the preserved timm models: a spatial mean (CNNs), the mean over "
                  "tokens or the class token (transformers, MLP-Mixers).", "",
                  "| reduction | preserved | " + " | ".join(METHODS) + " |", "|---|---|---|---|---|"]
        for kind in ("spatial mean", "token mean", "class token"):
            counts = [reductions.get((kind, m), 0) for m in METHODS]
            lines.append(f"| {kind} | {sum(counts)} | " + " | ".join(map(str, counts)) + " |")
    heads = collections.Counter((r["reduction"] or "spatial mean", r["sac_heads"] > 0) for r in records
                                if r["outcome"] == "preserved" and r.get("sac_heads") is not None)
    if heads:
        lines += ["", "Default SAC heads on the preserved models (each head checked to give one row of logits per "
                  "image); a model without them converts, and `--sac-stages` can still name taps:", "",
                  "| reduction | with SAC heads | without |", "|---|---|---|"]
        for kind in ("spatial mean", "token mean", "class token"):
            if heads.get((kind, True)) or heads.get((kind, False)):
                lines.append(f"| {kind} | {heads.get((kind, True), 0)} | {heads.get((kind, False), 0)} |")
    with_cli = any(summary["cli"].values())
    if with_cli:
        lines += ["", "## Through the command line", "",
                  "Each model in the CLI column was also run as a user runs it, in a subprocess (offline, no GPU, "
                  "empty caches): `python -m flexsurgeon convert MODEL --random-init --img-size INPUT "
                  f"--num-classes {NUM_CLASSES} -o DIR` and `python -m flexsurgeon inspect MODEL` with the same "
                  "options. `preserved`: preserved by the API walk, convert exits 0 and prints the `converted` "
                  "line, the costs table and the `saved` line, no traceback, the folder loads with "
                  "`flexsurgeon.load` and with timm's `local-dir:` (same output), inspect exits 0. `refused`: "
                  "refused by the API walk, convert exits 1 with one `Error:` line and leaves no folder, inspect "
                  "exits 1. `failed`: anything else (the reason says what). `skipped`: a command timed out.", "",
                  "| source | " + " | ".join(CLI_RESULTS) + " | total |", "|---|" + "---|" * (len(CLI_RESULTS) + 1)]
        for src, counter in summary["cli"].items():
            if counter:
                lines.append(f"| {src} | " + " | ".join(str(counter.get(o, 0)) for o in CLI_RESULTS)
                             + f" | {sum(counter.values())} |")
        api_only = summary["api_only"]
        lines += ["", f"Preserved through the API but not through the CLI: {len(api_only)}"
                  + (f" ({', '.join(api_only)})." if api_only else ".")]
    lines += ["", "## Reasons, by kind", "", "| outcome | models | reason (names and numbers elided) |",
              "|---|---|---|"]
    for (outcome, reason), n in summary["reasons"].most_common():
        lines.append(f"| {outcome} | {n} | {_md(reason)} |")
    for reason, n in summary["cli_reasons"].most_common():
        lines.append(f"| CLI failed or skipped | {n} | {_md(reason)} |")
    cli_header = " CLI |" if with_cli else ""
    lines += ["", "## Models", "", f"| model | family | outcome |{cli_header} how | input | FlexPool | params (M) | s "
              "| reason |", "|---|---|---|" + "---|" * with_cli + "---|---|---|---|---|---|"]
    order = {o: i for i, o in enumerate(OUTCOMES)}
    for r in sorted(rows, key=lambda r: (r["source"] != "timm", order[r["outcome"]] == order["not-walked"],
                                         r["family"], r["model"])):
        cli_cell = f" {_cli_cell(r.get('cli'))} |" if with_cli else ""
        lines.append(f"| {r['model']} | {r['family']} | {r['outcome']} |{cli_cell} {r.get('method') or ''} "
                     f"| {r['img'] or ''} | {r['pool'] or ''} "
                     f"| {'' if r['params_m'] is None else r['params_m']} | "
                     f"{'' if r.get('seconds') is None else r['seconds']} | {_md(r['reason'])} |")
    path.write_text("\n".join(lines) + "\n")


def _seconds(record: dict) -> float:
    """A model's time in the walk: the API check, and the CLI check where it ran."""
    return (record.get("seconds") or 0) + ((record.get("cli") or {}).get("seconds") or 0)


def _cli_cell(cli: dict | None) -> str:
    """The Models table's CLI column: the result, and why for a failure (a refusal's reason is the
    reason column's already)."""
    if not cli or not cli.get("result"):
        return ""
    if cli["result"] in ("failed", "skipped"):
        return f"**{cli['result']}**: {_md(cli['reason'])}"
    return cli["result"]


def _md(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one model per timm module and torchvision family")
    parser.add_argument("--all", action="store_true", help="also walk timm models without a pool_size")
    parser.add_argument("--filter", action="append", default=[], help="fnmatch pattern(s) on model names "
                        "(torchvision ones are named tv:NAME); repeatable")
    parser.add_argument("--limit", type=int, default=0, help="walk at most this many models")
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--max-params", type=float, default=300.0, help="skip models above this many million params")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model")
    parser.add_argument("--budget-min", type=float, default=0, help="stop starting models after this many minutes")
    parser.add_argument("--roundtrip", action="store_true", help="also save, load and compare each preserved model")
    parser.add_argument("--via-cli", action=argparse.BooleanOptionalAction, default=None,
                        help="also run each walked model through `python -m flexsurgeon convert` and `inspect` in a "
                             "subprocess and check what a user sees (default: on with --quick, off otherwise)")
    parser.add_argument("--records", type=Path, default=None, help="JSON-lines results file (default: a temp file)")
    parser.add_argument("--shard", default="", metavar="K/N",
                        help="walk every N-th model from the K-th (0-based), for N processes side by side, each "
                             "with its own --records; then --report-only over the records put together")
    parser.add_argument("--resume", action="store_true", help="skip models already in --records")
    parser.add_argument("--retry-skipped", action="store_true",
                        help="with --resume, walk models recorded as skipped again (e.g. with a larger --max-params)")
    parser.add_argument("--out", type=Path, default=HERE / "zoo_coverage.md")
    parser.add_argument("--report-only", action="store_true", help="write the table from --records, walk nothing")
    parser.add_argument("--preserved-in", type=Path, default=None,
                        help="walk only the models an earlier records file has as preserved (a re-walk after a change)")
    parser.add_argument("--refused-in", type=Path, default=None,
                        help="walk only the models an earlier records file has as refused (a re-walk after flexsurgeon "
                             "learned to convert more)")
    args = parser.parse_args(argv)
    args.only = None  # the models an earlier walk recorded with an outcome; --filter narrows them further
    for path, outcome in ((args.preserved_in, "preserved"), (args.refused_in, "refused")):
        if path:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            args.only = (args.only or set()) | {r["model"] for r in records if r["outcome"] == outcome}
            args.all = True  # the list names the models; the pool_size filter does not apply
    if args.report_only:
        args.resume, args.budget_min, args.limit = True, -1, 0
    if args.via_cli is None:
        args.via_cli = args.quick

    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    command = "python benchmarks/zoo_coverage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    walk, not_walked = list_candidates(args)
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        walk = walk[k::n]
    records_path = args.records or Path(tempfile.mkstemp(prefix="zoo_coverage_", suffix=".jsonl")[1])
    records, latest = [], {}
    if args.resume and records_path.exists():
        # a model walked again (--retry-skipped) has a later line; that one counts
        for line in records_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record["model"]] = record
        walking = set(walk)
        records = [r for r in latest.values() if r["model"] in walking]
        if args.retry_skipped:
            records = [r for r in records if r["outcome"] != "skipped"]
        if args.via_cli and not args.report_only:  # recorded before the CLI check (or without it): walk again
            records = [r for r in records if r["outcome"] == "skipped" or "cli" in r]
    done = {r["model"] for r in records}
    todo = [n for n in walk if n not in done]
    print(f"{len(walk)} models to walk ({len(done)} already in {records_path}), {len(not_walked)} not walked",
          flush=True)
    start = time.time()
    complete = True
    with open(records_path, "a" if args.resume else "w") as sink:
        for i, label in enumerate(todo):
            if args.budget_min and time.time() - start > max(0, args.budget_min) * 60:
                complete = False
                print(f"time budget of {args.budget_min:g} min spent after {i} of {len(todo)} models", flush=True)
                break
            record = check_model(label, args)
            cli_note = ""
            if args.via_cli and record["outcome"] != "skipped":
                record["cli"] = check_cli(record, args)
                if record["cli"]["result"]:
                    cli_note = f" | CLI: {record['cli']['result']} {record['cli']['seconds']}s " + (
                        record["cli"]["reason"] if record["cli"]["result"] in ("failed", "skipped") else "")
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            print(f"[{len(records)}/{len(walk)}] {label}: {record['outcome']} {record['img'] or ''} "
                  f"{record['seconds']}s {record['reason']}{cli_note}", flush=True)
    if args.retry_skipped or (args.resume and args.via_cli):  # drop the superseded lines: one line per model again
        latest.update((r["model"], r) for r in records)  # models outside a --filter are kept
        tmp = records_path.with_name(records_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in latest.values()))
        os.replace(tmp, records_path)
    write_table(records, not_walked, args.out, command, complete and not args.truncated)
    summary = summarize(records)
    print(f"\nwrote {args.out} (records: {records_path})")
    for src, counter in summary["counts"].items():
        if counter:
            print(f"{src}: " + ", ".join(f"{o} {counter.get(o, 0)}" for o in OUTCOMES[:-1])
                  + f" (walked {sum(counter.values())}); preserved: "
                  + ", ".join(f"{m} {summary['methods'][src][m]}" for m in METHODS))
    print(f"not walked: {len(not_walked)}")
    for (outcome, reason), n in summary["reasons"].most_common(12):
        print(f"  {n:4d} {outcome}: {reason}")
    for src, counter in summary["cli"].items():
        if counter:
            print(f"{src} through the CLI: " + ", ".join(f"{o} {counter.get(o, 0)}" for o in CLI_RESULTS)
                  + f" (checked {sum(counter.values())})")
    for reason, n in summary["cli_reasons"].most_common(12):
        print(f"  {n:4d} CLI failed or skipped: {reason}")
    if any(summary["cli"].values()):
        api_only = summary["api_only"]
        print(f"preserved through the API but not through the CLI: {len(api_only)}"
              + (f" ({', '.join(api_only)})" if api_only else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
