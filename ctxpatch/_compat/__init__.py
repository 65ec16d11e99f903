"""The compatibility boundary: every use of a library's version-specific or private internals.

One module per library (`transformers`, `torch`; `lm_eval` for lm-eval's HFLM internals), each
exposing named functions, so an upgrade that moves an internal breaks one function here and
nowhere else. `tests/test_compat_boundary.py` fails when code outside this package imports from
`transformers.models`, uses a transformers / lm-eval private name, or calls `torch.ops.aten`.
"""
