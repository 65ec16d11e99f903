#!/usr/bin/env bash
# The 4x / 8x leaderboard of the multi-view issue on the default model (SmolLM2-135M, trained to 8k), on the
# held-out plays only (never trained or tuned on), parameters from each measured length (--target-len auto).
# Resumable: every forward's score lands in the stage's scores.jsonl as it is computed, so a stage killed after
# hours continues where it stopped when the same line is run again (--resume). Results: benchmarks/grid/STAGE-PART.
#   bash benchmarks/grid.sh ceiling          the unpatched model at 8k: the retrieval a patch can reach untrained
#   bash benchmarks/grid.sh 16k              dca, dca+logn, selfextend, yarn, dynamic, string, none
#   bash benchmarks/grid.sh 32k              dca, dca+logn, selfextend, yarn, dynamic
#   bash benchmarks/grid.sh 64k SPEC...      the three best of 32k: ppl + passkey at 3 depths (~25 min a forward)
#   REPORT=1 bash benchmarks/grid.sh STAGE ...   no forward: each part's leaderboard.md from the scores so far
#                                                (64k without specs: every spec it has scored)
# Parts: `ppl` (perplexity + passkey at 5 depths) and `niah` (needle at 3 depths). On 2 idle cores a forward takes
# ~30 s at 8k, ~2 min at 16k, ~6 min at 32k: 16k is ~2.5 h, 32k ~7 h, 64k ~5 h for three specs.
set -euo pipefail
stage=${1:?usage: grid.sh ceiling | 16k | 32k | 64k SPEC...}
shift || true
root=benchmarks/grid
common=(--tail 1024 --text held-out --resume)
[ -n "${REPORT:-}" ] && common+=(--report)

part() {  # part NAME LENGTH SPECS TASKS DEPTHS [extra...]
  local name=$1 length=$2 specs=$3 tasks=$4 depths=$5
  shift 5
  if [ -n "${REPORT:-}" ] && [ ! -s "$root/$stage-$name/scores.jsonl" ]; then
    echo "$root/$stage-$name: nothing scored yet" >&2
    return 0
  fi
  ctxpatch compare --patches "$specs" --lengths "$length" --tasks "$tasks" --depths "$depths" "${common[@]}" \
    --out "$root/$stage-$name" "$@"
}

case "$stage" in
  ceiling)
    part ppl 8k none ppl,passkey 0,0.25,0.5,0.75,1
    part niah 8k none niah 0.25,0.5,0.75 ;;
  16k|32k)
    specs="dca,dca+logn,selfextend,yarn,dynamic"
    [ "$stage" = 16k ] && specs="$specs,string,none"
    part ppl "$stage" "$specs" ppl,passkey 0,0.25,0.5,0.75,1 --target-len auto
    part niah "$stage" "$specs" niah 0.25,0.5,0.75 --target-len auto ;;
  64k)
    # every spec scored so far: the leaderboard lists them all, also after a run that named fewer
    scored=$(sed -n 's/.*"state": "\([^"@]*\)@65536".*/\1/p' "$root/64k-ppl/scores.jsonl" 2>/dev/null | sort -u | paste -sd, -)
    if [ $# -gt 0 ]; then
      specs=$(IFS=,; echo "$*")
    elif [ -n "${REPORT:-}" ] && [ -n "$scored" ]; then
      specs=$scored
    else
      echo "name the three best specs of 32k: grid.sh 64k SPEC SPEC SPEC" >&2; exit 2
    fi
    part ppl 64k "$specs" ppl,passkey 0.25,0.5,0.75 --target-len auto
    all=$(echo "$specs,$scored" | tr , '\n' | sed '/^$/d' | awk '!seen[$0]++' | paste -sd, -)
    if [ -z "${REPORT:-}" ] && [ "$all" != "$specs" ]; then
      part ppl 64k "$all" ppl,passkey 0.25,0.5,0.75 --target-len auto --report
    fi ;;
  *) echo "unknown stage $stage: use ceiling, 16k, 32k or 64k" >&2; exit 2 ;;
esac
