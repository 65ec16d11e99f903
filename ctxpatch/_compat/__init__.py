"""The compatibility boundary: every use of a library's version-specific or private internals."""
