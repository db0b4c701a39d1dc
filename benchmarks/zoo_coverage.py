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
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the zoo_* modules beside this script

import torch  # noqa: E402
from zoo_cli import check_cli  # noqa: E402
from zoo_common import (  # noqa: E402
    CLI_RESULTS,
    HERE,
    METHODS,
    NUM_CLASSES,
    OUTCOMES,
    SIZE_PROBLEMS,
    SMALL_TOKEN_SIZE,
    Timeout,
    eval_output,
    first_line,
    time_limit,
)
from zoo_models import list_candidates, param_count_m, timm_module, timm_sizes, tv_family, tv_sizes  # noqa: E402
from zoo_report import summarize, write_table  # noqa: E402

import flexsurgeon  # noqa: E402
from flexsurgeon.errors import AnalysisError, FlexSurgeonError, TraceError  # noqa: E402
from flexsurgeon.surgery.apply import new_parameter_names  # noqa: E402
from flexsurgeon.surgery.convert import PRESERVATION_TOLERANCE  # noqa: E402
from flexsurgeon.surgery.sources import build_source, parse_source, spec_at_size  # noqa: E402


def _timm_traces(model) -> tuple[bool, str]:
    from timm.models import get_graph_node_names

    try:
        get_graph_node_names(model)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means timm cannot trace it either
        return False, first_line(exc)



def _verify(source, converted, size) -> str | None:
    """None when the conversion is right; else why it is wrong."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    expected, got = eval_output(source, x), eval_output(converted, x)
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
              "family": tv_family(label[3:]) if library == "torchvision" else timm_module(label),
              "outcome": None, "reason": "", "img": None, "pool": None, "params_m": None}

    def done(outcome, reason=""):
        record.update(outcome=outcome, reason=reason, seconds=round(time.time() - start, 1))
        return record

    spec = parse_source(label, num_classes=NUM_CLASSES)
    params = param_count_m(spec)
    if params is not None and params > args.max_params:
        record["params_m"] = round(params, 1)
        return done("skipped", f"{params:.0f}M parameters > --max-params {args.max_params:g}M")
    try:
        with time_limit(args.timeout):
            torch.manual_seed(0)
            try:
                source = build_source(spec, "random")
            except FlexSurgeonError:
                raise
            except Exception as exc:  # noqa: BLE001 - the library's own builder failed
                return done("skipped", f"does not build: {first_line(exc)}")
            params = sum(p.numel() for p in source.parameters()) / 1e6
            record["params_m"] = round(params, 1)
            if params > args.max_params:
                return done("skipped", f"{params:.0f}M parameters > --max-params {args.max_params:g}M")
            sizes = tv_sizes(label[3:]) if library == "torchvision" else timm_sizes(label)
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
                        refusals[size] = f"does not build at {size[0]}x{size[1]}: {first_line(exc)}"
                        continue
                try:  # conversion changes the model it is given: the source stays as it was, to compare
                    converted = flexsurgeon.convert(copy.deepcopy(source), img_size=size, num_classes=NUM_CLASSES)
                except TraceError as exc:
                    if library == "timm":
                        traces, why = _timm_traces(source)
                        if not traces:
                            return done("timm-untraceable", why)
                        return done("wrong", f"timm traces it but flexsurgeon does not: {first_line(exc)}")
                    return done("refused", first_line(exc))
                except AnalysisError as exc:
                    message = first_line(exc)
                    if message.startswith("the converted model's output differs"):
                        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
                        if not torch.isfinite(eval_output(source, x)).all():
                            return done("skipped", "the source's random-init output is not finite")
                        return done("wrong", message)
                    refusals[size] = message
                    if not any(p in message for p in SIZE_PROBLEMS):
                        break
                    continue
                except FlexSurgeonError as exc:
                    return done("refused", first_line(exc))
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
    except Timeout as exc:
        return done("skipped", str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is a flexsurgeon bug
        return done("wrong", f"unexpected {type(exc).__name__}: {first_line(exc)}")


def _round_trip(label, size, source) -> str | None:
    """Convert by name, save, load: the loaded model's output must equal the saved one's."""
    converted = flexsurgeon.convert(label, img_size=size, num_classes=NUM_CLASSES, weights="random")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = flexsurgeon.load(flexsurgeon.save(converted, Path(tmp) / "ckpt"))
    expected, got = eval_output(converted, x), eval_output(loaded, x)
    if not torch.allclose(got, expected, rtol=0, atol=PRESERVATION_TOLERANCE * max(1.0, expected.abs().max().item())):
        return "the loaded checkpoint's output differs from the saved model's"
    return None


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
