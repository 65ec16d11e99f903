"""Scales: a factor kappa_i on a query's dot products. One file per method.

Found by ctxpatch.registry.discover (pkgutil): a new method file needs no line here.
"""
