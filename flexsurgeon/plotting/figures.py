"""matplotlib figures for flexsurgeon's plots, drawn on matplotlib's Agg canvas directly,
without pyplot, so plotting neither needs a display nor changes a caller's pyplot backend;
each is saved as a PNG written to a temporary file and renamed into place.

matplotlib is an optional extra (``pip install 'flexsurgeon[plot]'``), imported inside the
functions.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PlotError
from ..utils import replacing

INSTALL_HINT = "pip install 'flexsurgeon[plot]'"
_DPI = 120


def require_matplotlib() -> None:
    """Fail with the install hint when matplotlib is missing (before any slow work)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise PlotError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def new_figure(**kwargs):
    """A matplotlib Figure on an Agg canvas, outside pyplot's global state."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically: a temporary sibling, then os.replace."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI)
    except OSError as exc:
        raise PlotError(f"could not write {path}: {exc.strerror or exc}") from exc
    return path
