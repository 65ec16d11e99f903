#!/usr/bin/env bash
# Query-aware block retrieval (`retrieval`, issue 27) on the default model (SmolLM2-135M-Instruct, trained to 8k,
# Q4_1 GGUF dequantized to fp32), on the held-out plays only, parameters from each measured length (--target-len
# auto), three prompts per depth at 32k and 64k. Resumable (--resume): every forward's score lands in the part's
# scores.jsonl as it is computed. Results: benchmarks/retrieval/STAGE-PART.
#   bash benchmarks/retrieval.sh 32k [SPEC...]     ppl + passkey at 5 depths x 3 prompts; niah at 3 depths x 3 prompts
#   bash benchmarks/retrieval.sh 32k-ruler [SPEC...]   RULER niah_multikey_3 and ruler_vt, 3 prompts
#   bash benchmarks/retrieval.sh 64k [SPEC...]     ppl + passkey at 3 depths x 3 prompts
#   bash benchmarks/retrieval.sh 128k [SPEC...]    ppl + passkey at 3 depths x 1 prompt
#   REPORT=1 bash benchmarks/retrieval.sh STAGE ...    no forward: each part's leaderboard from the scores so far
# SPEC defaults: retrieval, retrieval+dca, retrieval[scorer=quest] (the scorer variant), dca, selfextend.
set -euo pipefail
stage=${1:?usage: retrieval.sh 32k | 32k-ruler | 64k | 128k [SPEC...]}
shift || true
specs=$(IFS=,; echo "${*:-retrieval,retrieval+dca,retrieval[scorer=quest],dca,selfextend}")
root=benchmarks/retrieval
common=(--tail 1024 --text held-out --resume --target-len auto --patches "$specs")
[ -n "${REPORT:-}" ] && common+=(--report)
part() {  # part NAME LENGTH TASKS DEPTHS SAMPLES
  ctxpatch compare "${common[@]}" --lengths "$2" --tasks "$3" --depths "$4" --samples "$5" --out "$root/$stage-$1"
}
case "$stage" in
  32k) part ppl 32k ppl,passkey 0,0.25,0.5,0.75,1 3
       part niah 32k niah 0.25,0.5,0.75 3 ;;
  32k-ruler) part ruler 32k niah_multikey_3,ruler_vt 0.5 3 ;;
  64k) part ppl 64k ppl,passkey 0.25,0.5,0.75 3 ;;
  128k) part ppl 128k ppl,passkey 0.25,0.5,0.75 1 ;;
  *) echo "unknown stage $stage: use 32k, 32k-ruler, 64k or 128k" >&2; exit 2 ;;
esac
