"""lm-eval's own command line, with ctxpatch's model type registered:

    python -m ctxpatch.eval.harness --model ctxpatch \
        --model_args pretrained=FOLDER,patch=selfextend,target_len=16384 \
        --include_path "$(python -c 'import ctxpatch.eval.tasks as t; print(t.TASKS_DIR)')" \
        --tasks ctxpatch_passkey,ctxpatch_ppl --device cuda

lm-eval 0.4 finds models only in its registry (`lm_eval.api.registry`), which a package fills when it is
imported; it has no plugin entry points, and `--include_path` loads task YAMLs, not models. So plain `lm_eval
--model ctxpatch` cannot see ctxpatch's model: this module imports it, then runs lm-eval's `cli_evaluate` with
the same arguments. From Python, `import ctxpatch.eval.lm` is enough:
`lm_eval.simple_evaluate(model="ctxpatch", model_args="pretrained=...,patch=...,target_len=...", ...)`.

Model arguments: `pretrained` (what `ctxpatch eval --model` takes), `patch` (a spec; default none), `target_len`,
`max_length` (default target_len + 256), `dtype`, `device_map=auto`, `backend`, and any other key as a patch
parameter (`window=4096`). The tasks read lengths from `--metadata '{"lengths": [...]}'`, else target_len.
Data parallel: `torchrun --nproc_per_node N -m ctxpatch.eval.harness ...` (one result file, from rank 0).
"""

from __future__ import annotations

from . import lm  # noqa: F401  (registers the "ctxpatch" model with lm-eval)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
