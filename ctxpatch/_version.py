"""The version of ctxpatch: one place, read by `ctxpatch.__version__`, the CLI and the packaging."""

__version__ = "0.1.0"
