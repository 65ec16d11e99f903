#!/usr/bin/env bash
# ctxpatch's long-context tasks through lm-eval's own command line, with a patch applied at load.
#
#   bash examples/lm_eval_harness.sh                                   # default model, selfextend for 16k, passkey + ppl at 16k
#   PATCH="yarn[factor=4]" TARGET_LEN=32768 LENGTHS="[16384, 32768]" bash examples/lm_eval_harness.sh
#   MODEL=FOLDER TARGET_LEN=384 LENGTHS="[256]" TASKS=ctxpatch_passkey DEVICE=cpu bash examples/lm_eval_harness.sh   # tiny
#
# lm-eval finds models only once their package is imported (it has no plugin entry points), so plain
# `lm_eval --model ctxpatch` cannot see ctxpatch's model type: `python -m ctxpatch.eval.harness` is lm-eval's
# own CLI (same arguments) after `import ctxpatch.eval.lm`. From Python: `import ctxpatch.eval.lm`, then
# `lm_eval.simple_evaluate(model="ctxpatch", model_args="pretrained=...,patch=...,target_len=...", ...)`.
# Data parallel: `torchrun --nproc_per_node N -m ctxpatch.eval.harness ...` (one result file, from rank 0).
set -euo pipefail

PYTHON="${PYTHON:-python}"
MODEL="${MODEL:-default}"            # "default" (SmolLM2-135M-Instruct), a folder, a .gguf, a hub id, a fine-tune run
PATCH="${PATCH:-selfextend}"         # any ctxpatch spec; none = unpatched
TARGET_LEN="${TARGET_LEN:-16384}"    # parameters from this length; max_length defaults to TARGET_LEN + 256
TASKS="${TASKS:-ctxpatch_passkey,ctxpatch_ppl}"   # also ctxpatch_niah, ctxpatch_passkey_gen, ctxpatch_niah_gen
LENGTHS="${LENGTHS:-[$TARGET_LEN]}"  # the tasks' lengths (JSON list; default: the target)
DEPTHS="${DEPTHS:-[0.2, 0.8]}"       # where the passkey / needle is hidden
TAIL="${TAIL:-1024}"                 # perplexity: tokens scored at the end of each window
DEVICE="${DEVICE:-cpu}"              # cuda on a GPU
OUT="${OUT:-runs/lm-eval}"           # lm-eval writes results_*.json (and samples with --log_samples) here

# --model_args: pretrained, patch, target_len, and optionally max_length, dtype, device_map=auto, backend,
# or any patch parameter (window=4096). The task configs live inside the package:
TASKS_DIR="$("$PYTHON" -c 'import ctxpatch.eval.tasks as t; print(t.TASKS_DIR)')"
# --metadata reaches the tasks' dataset builders (ctxpatch/eval/tasks/utils.py lists the keys: lengths,
# depths, samples, seed, text_files, tail, train_len); lm-eval merges the model args into it too.
"$PYTHON" -m ctxpatch.eval.harness \
    --model ctxpatch \
    --model_args "pretrained=$MODEL,patch=$PATCH,target_len=$TARGET_LEN" \
    --include_path "$TASKS_DIR" \
    --tasks "$TASKS" \
    --metadata "{\"lengths\": $LENGTHS, \"depths\": $DEPTHS, \"tail\": $TAIL}" \
    --device "$DEVICE" \
    --output_path "$OUT"
