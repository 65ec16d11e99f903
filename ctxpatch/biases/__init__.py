"""Biases: an additive term b_h(i, j) of the score. One file per method.

Found by ctxpatch.registry.discover (pkgutil): a new method file needs no line here.
"""
