#!/usr/bin/env bash
# The README's leaderboard on the default model (SmolLM2-135M, trained to 8k), in two stages so that the costly
# 32k forwards (~5 min each on 2 CPU cores) are spent only on the specs that held up at 16k.
#   stage 1: bash benchmarks/leaderboard.sh 16k          (10 specs x 8k,16k: ~1.5 h on 2 idle cores)
#   stage 2: bash benchmarks/leaderboard.sh 32k SPEC...  (none, dynamic, yarn x4 + the given specs at 32k)
# Each stage writes runs/leaderboard-<stage>/leaderboard.{md,json} and the plots.
set -euo pipefail
stage=${1:?usage: leaderboard.sh 16k | 32k SPEC...}
shift
case "$stage" in
  16k)
    ctxpatch compare \
      --patches "none,dynamic,yarn,yarn[factor=4],logn+window,hybrid+rerope,logn+window+rerope,selfextend,selfextend+logn,sinks" \
      --lengths 8k,16k --tasks ppl,passkey --depths 0,0.5,1 --out runs/leaderboard-16k ;;
  32k)
    extra=$(IFS=,; echo "$*")
    ctxpatch compare --patches "none,dynamic,yarn[factor=4]${extra:+,$extra}" \
      --lengths 32k --tasks ppl,passkey --depths 0,0.5,1 --out runs/leaderboard-32k ;;
  *) echo "unknown stage $stage: use 16k or 32k" >&2; exit 2 ;;
esac
