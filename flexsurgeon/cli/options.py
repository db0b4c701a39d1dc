"""The command line's shared options and its error handling (``cli.py`` holds the commands)."""
from __future__ import annotations

import functools
import warnings

import click

from ..errors import FlexSurgeonError
from ..layers.kinds import POOL_KINDS
from ..utils import clip, first_line, parse_size


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A warning on the command line is one line of what it says, not a source location and code."""
    click.echo(f"warning: {clip(first_line(message, str(category.__name__)), 300)}", err=True)


def friendly_errors(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.showwarning = _one_line_warning
                return command(*args, **kwargs)
        except FlexSurgeonError as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # an unexpected failure still gets one line, not a traceback
            if debug:
                raise
            first = first_line(exc, "")
            raise click.ClickException(f"unexpected {type(exc).__name__}: {clip(first, 300)} "
                                       "(rerun with --debug for the traceback)") from None
    return run


def size_callback(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not a size: {exc}") from None


def stages_callback(ctx, param, value):
    if value is None:
        return None
    if value.strip().lower() in ("none", ""):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def weights_callback(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers") from None


def surgery_options(command):
    options = [
        click.option("--img-size", callback=size_callback, metavar="N|HxW",
                     help="Input size FlexPool is built for [default: the model's pretrained input size]."),
        click.option("--in-chans", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Input channels (timm models)."),
        click.option("--num-classes", type=click.IntRange(min=1), help="Classes of the new classifier."),
        click.option("--pool", type=click.Choice(POOL_KINDS), default="softmax", show_default=True,
                     help="FlexPool parametrisation (linear adds a sum-to-one regulariser); avg, lse, simpool "
                          "and token are fixed or timm baselines for ablations."),
        click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Dropout on the pooled vector (the paper uses 0.25)."),
        click.option("--sac-stages", callback=stages_callback, metavar="LIST",
                     help="SAC taps: stage indices, node names or module paths, comma-separated; "
                          "'none' for no heads [default: the two stages before the last]."),
        click.option("--sac-weights", callback=weights_callback, metavar="LIST",
                     help="Loss weights, heads then main, increasing [default: 0.1,0.2,0.7 for two heads]."),
        click.option("--replace-gating", is_flag=True, help="Also replace squeeze-excite (gating) pools."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def weight_options(command):
    """Where the source model's weights come from: ``weights`` is "pretrained" or "random",
    ``weights_file`` a local state dict that takes precedence."""
    options = [
        click.option("--pretrained", "weights", flag_value="pretrained", default=True,
                     help="Start from the library's pretrained weights (needs network) [default]."),
        click.option("--weights", "weights_file", type=click.Path(dir_okay=False),
                     help="Start from a local state dict (.safetensors, or .pth/.bin read with weights_only=True)."),
        click.option("--random-init", "weights", flag_value="random", help="Start from random weights."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


MODEL_CODE_HELP = ("FILE.py:FACTORY that builds the source model of a folder converted from your own model "
                    "(flexsurgeon never imports code a folder names)")


def model_code_callback(ctx, param, value):
    from ..surgery.model_code import is_model_code

    if value is not None and not is_model_code(value):
        raise click.BadParameter(f"'{value}' is not FILE.py:FACTORY")
    return value


def model_code_option(command):
    return click.option("--model-code", callback=model_code_callback, metavar="FILE.py:FACTORY", help=MODEL_CODE_HELP)(
        command)


def surgery_kwargs(params: dict) -> dict:
    return {
        "img_size": params["img_size"], "in_chans": params["in_chans"], "num_classes": params["num_classes"],
        "pool": params["pool"], "dropout": params["dropout"], "sac_stages": params["sac_stages"],
        "sac_weights": params["sac_weights"], "replace_gating": params["replace_gating"],
    }
