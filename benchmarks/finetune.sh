#!/usr/bin/env bash
# The fine-tune issue's runs on the default model (SmolLM2-135M, trained to 8k), each resumable, their adapters
# kept under benchmarks/finetuned/NAME so that `ctxpatch eval --model benchmarks/finetuned/NAME` reproduces them.
#   bash benchmarks/finetune.sh train NAME         train one run (a kill: run it again, it resumes its checkpoint)
#   bash benchmarks/finetune.sh eval NAME LENGTH   its after-numbers at LENGTH (8k, 16k, 32k, 64k), resumable
#   bash benchmarks/finetune.sh before NAME LENGTH the same grid for the spec the run trains under, untrained
# NAME: 64k-pose, 64k-stretched (dca, 64k recipe), 32k-yarn, 32k-dca (pose, 32k recipe).
# eval: perplexity ratio against the *unpatched base model's* native perplexity on the same tokens
# (--reference base), passkey at 5 depths and niah at 3 (64k: passkey at 3), on the plays the run held apart.
set -euo pipefail
verb=${1:?usage: finetune.sh train NAME | eval NAME LENGTH | before NAME LENGTH}
shift
root=benchmarks/finetuned

name=${1:?name a run: 64k-pose, 64k-stretched, 32k-yarn or 32k-dca}
case "$name" in  # the recipe and overrides; the untrained spec the run starts from
  64k-pose) recipe=(recipes/smollm2-135m-64k.yaml positions=pose); untrained=(--patch dca) ;;
  64k-stretched) recipe=(recipes/smollm2-135m-64k.yaml positions=stretched); untrained=(--patch dca) ;;
  32k-yarn) recipe=(recipes/smollm2-135m-32k.yaml); untrained=(--patch yarn --target-len 32k) ;;
  32k-dca) recipe=(recipes/smollm2-135m-32k.yaml patch=dca); untrained=(--patch dca) ;;
  *) echo "unknown run $name: use 64k-pose, 64k-stretched, 32k-yarn or 32k-dca" >&2; exit 2 ;;
esac

grid() {  # grid OUT LENGTH ctxpatch-eval-arguments...
  local out=$1 length=$2
  shift 2
  local depths=0,0.25,0.5,0.75,1
  [ "$length" = 64k ] && depths=0.25,0.5,0.75
  ctxpatch eval "$@" --lengths "$length" --tasks ppl,passkey --depths "$depths" --tail 1024 --resume \
    --out "$out-ppl"
  [ "$length" = 64k ] || ctxpatch eval "$@" --lengths "$length" --tasks niah --depths 0.25,0.5,0.75 --resume \
    --out "$out-niah"
}

case "$verb" in
  train)
    began=$(date +%s)
    ctxpatch finetune "${recipe[@]}" output_dir="$root/$name" resume=true
    echo "$name: $(( $(date +%s) - began )) s of training this time ($(date -u +%FT%TZ))" >> "$root/wall-times.txt"
    rm -rf "$root/$name"/checkpoint-*  # the adapter and ctxpatch.json are what is kept
    ;;
  eval)
    length=${2:?give a length}
    grid "$root/$name/eval-$length" "$length" --model "$root/$name" --reference base ;;
  before)
    length=${2:?give a length}
    grid "$root/before-${untrained[1]}-$length" "$length" --model default "${untrained[@]}" --text held-out ;;
  *) echo "unknown verb $verb: use train, eval or before" >&2; exit 2 ;;
esac
