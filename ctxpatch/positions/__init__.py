"""Position rules: what replaces R(i)q . R(j)k. One file per method (or per family).

Found by ctxpatch.registry.discover (pkgutil): a new method file needs no line here.
"""
