"""lm-eval task configs shipped with ctxpatch: `lm_eval --include_path <TASKS_DIR> --tasks ctxpatch_passkey ...`."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
