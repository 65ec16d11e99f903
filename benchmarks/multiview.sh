#!/usr/bin/env bash
# The multi-view leaderboard (dca, string, selfextend with parameters from the target length) on the default
# model, on the held-out plays only (ctxpatch.loading.assets.HELD_OUT_PLAYS: never trained or tuned on).
# One compare per stage; each adds one 8k native-reference forward. Forwards take ~6 min at 32k, ~2 min at 16k
# on 2 idle cores.
#   bash benchmarks/multiview.sh 32k SPEC...   ppl + passkey at depths 0.25,0.75, one compare per spec
#   bash benchmarks/multiview.sh 16k SPEC...   ppl + passkey at depths 0,0.5,1, all specs in one compare
set -euo pipefail
stage=${1:?usage: multiview.sh 32k|16k SPEC...}
shift
common=(--lengths "$stage" --tasks ppl,passkey --tail 1024 --text held-out --target-len auto)
case "$stage" in
  32k)
    for spec in "$@"; do
      ctxpatch compare --patches "$spec" "${common[@]}" --depths 0.25,0.75 --out "runs/mv32k-${spec%%[*}"
    done ;;
  16k)
    specs=$(IFS=,; echo "$*")
    ctxpatch compare --patches "$specs" "${common[@]}" --depths 0,0.5,1 --out runs/mv16k ;;
  *) echo "unknown stage $stage: use 32k or 16k" >&2; exit 2 ;;
esac
