"""Masks: which (i, j) pairs a query may attend to. One file per method.

Found by ctxpatch.registry.discover (pkgutil): a new method file needs no line here.
"""
