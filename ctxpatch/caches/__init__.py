"""Cache policies: what the KV cache keeps. One file per method.

Found by ctxpatch.registry.discover (pkgutil): a new method file needs no line here.
"""
