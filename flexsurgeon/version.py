"""flexsurgeon's version, in one place (the package and model cards read it)."""

__version__ = "0.1.0"
