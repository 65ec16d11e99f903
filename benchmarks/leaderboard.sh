#!/usr/bin/env bash
# The first leaderboard (benchmarks/README.md, 2026-11-25) on the default model (SmolLM2-135M, trained to 8k), in stages so that the costly
# 32k forwards (~6 min each on 2 CPU cores, full attention) are spent only on the specs that held up at 16k.
#   bash benchmarks/leaderboard.sh 16k            7 specs x 8k,16k, 2 passkey depths: ~45 min on 2 idle cores
#   bash benchmarks/leaderboard.sh 32k SPEC...    each spec alone at 32k (1 depth): ~12-18 min a spec
#   bash benchmarks/leaderboard.sh finetuned DIR  a fine-tune run folder at 8k,16k (2 depths) and 32k (1 depth)
# Each writes runs/<stage>/leaderboard.{md,json} and the plots. `--tail 1024`: the last 1,024 tokens are scored.
set -euo pipefail
stage=${1:?usage: leaderboard.sh 16k | 32k SPEC... | finetuned DIR}
shift
case "$stage" in
  16k)
    ctxpatch compare \
      --patches "none,dynamic,yarn[factor=4],selfextend,selfextend+logn,hybrid+rerope,logn+window" \
      --lengths 8k,16k --tasks ppl,passkey --depths 0.2,0.8 --tail 1024 --out runs/leaderboard-16k ;;
  32k)
    # one compare per spec: results land as each finishes (each adds one 8k native-reference forward)
    for spec in "${@:-selfextend}"; do
      ctxpatch compare --patches "$spec" --lengths 32k --tasks ppl,passkey --depths 0.5 --tail 1024 \
        --out "runs/lb32k-${spec%%[*}"
    done ;;
  finetuned)
    run=${1:?usage: leaderboard.sh finetuned DIR}
    ctxpatch eval --model "$run" --lengths 8k,16k --tasks ppl,passkey --depths 0.2,0.8 --tail 1024 --out runs/after-16k
    ctxpatch eval --model "$run" --lengths 32k --tasks ppl,passkey --depths 0.5 --tail 1024 --out runs/after-32k ;;
  *) echo "unknown stage $stage: use 16k, 32k or finetuned" >&2; exit 2 ;;
esac
