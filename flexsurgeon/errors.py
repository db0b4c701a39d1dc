"""The one error family flexsurgeon raises on bad input.

Every error a user can cause is a ``FlexSurgeonError``; the CLI turns it into one line
and a non-zero exit. Each pipeline stage has its own subclass so callers can tell where
things went wrong without parsing messages.
"""


import re

# torch's DataLoader re-raises a worker's exception as ``type(exc)(msg)`` with the worker's
# traceback inside the message; ours keep their one line and the traceback as an attribute.
_WORKER_MESSAGE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


class FlexSurgeonError(Exception):
    """Base class: a problem with the user's model, options or files."""

    worker_traceback: str | None = None

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_MESSAGE.match(args[0]):
            self.worker_traceback = args[0]
            last = args[0].rstrip().splitlines()[-1]
            args = (re.sub(r"^[\w.]+Error: ", "", last),)
        super().__init__(*args)


class ModelNotFoundError(FlexSurgeonError):
    """The model name is not a known timm or torchvision model."""


class WeightsError(FlexSurgeonError):
    """Weights could not be obtained or do not fit the model."""


class TraceError(FlexSurgeonError):
    """torch.fx could not trace the model."""


class AnalysisError(FlexSurgeonError):
    """The traced model has nothing flexsurgeon can convert, or the input size does not fit."""


class PlanError(FlexSurgeonError):
    """A surgery plan is invalid or does not match the model it is applied to."""


class CheckpointError(FlexSurgeonError):
    """A checkpoint folder is missing, incomplete or inconsistent."""


class RecipeError(FlexSurgeonError):
    """A recipe file or override has an unknown key, a wrong type or an impossible value."""


class TrainingError(FlexSurgeonError):
    """Fine-tuning cannot start or had to stop (a NaN loss, classes that do not match)."""


class DataError(FlexSurgeonError):
    """A --data spec, folder or data file is missing, empty, malformed or inconsistent."""


class AblationError(FlexSurgeonError):
    """An ablation asks for an unknown variant, or its folder holds one with other settings."""


class ExportError(FlexSurgeonError):
    """A model cannot be exported (ONNX or an inference folder), or the export tools are missing."""


class PlotError(FlexSurgeonError):
    """Nothing plottable, an unreadable log or results file, or matplotlib is not installed."""


class HubError(FlexSurgeonError):
    """The Hugging Face Hub could not be used (no huggingface_hub, no credentials, no network)."""
