#!/usr/bin/env bash
# The multi-view leaderboard (dca, string, selfextend from target_len) on the default model, on the
# held-out plays only (ctxpatch.models.HELD_OUT_PLAYS: never trained or tuned on). One compare per
# spec so results land as each finishes; each adds one 8k native-reference forward.
#   bash benchmarks/multiview.sh 32k SPEC...   ppl + passkey at depths 0.25,0.75 (~6 min a forward on 2 cores)
#   bash benchmarks/multiview.sh 16k SPEC...   ppl + passkey at depths 0,0.25,0.5,0.75,1 (~2 min a forward)
set -euo pipefail
stage=${1:?usage: multiview.sh 32k|16k SPEC...}
shift
held=$(python -c "from ctxpatch.models import play_files; print(' '.join(map(str, play_files('held-out'))))")
case "$stage" in
  32k) depths=0.25,0.75 ;;
  16k) depths=0,0.25,0.5,0.75,1 ;;
  *) echo "unknown stage $stage: use 32k or 16k" >&2; exit 2 ;;
esac
for spec in "$@"; do
  name=$(echo "$spec" | tr -c 'a-z0-9+\n' '_')
  ctxpatch compare --patches "$spec" --lengths "$stage" --tasks ppl,passkey --depths "$depths" --tail 1024 \
    --text $held --out "runs/mv${stage}-${name}"
done
