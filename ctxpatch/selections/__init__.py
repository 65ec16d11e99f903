"""Selections: which keys a query sees, decided by their content. One file per method.

Found by ctxpatch.registry.discover (pkgutil): a new method file needs no line here.
"""
