#!/usr/bin/env bash
# Prepares .gpu_bundle/ (git-ignored, carried to the GPU machine): the wheels of benchmarks/gpu_wheels.txt for
# CPython 3.12 manylinux x86-64, and a copy of the embedded corpus and tokenizer cache (the GPU machine has no network).
set -euo pipefail
cd "$(dirname "$0")/.."
B=.gpu_bundle; mkdir -p $B/wheels $B/cache
PY=${PYTHON:-python3}
grep -v '^#' benchmarks/gpu_wheels.txt | grep . | while read -r spec; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d $B/wheels "$spec"
done
CACHE=$($PY -c "from concept_nb.data import cache_dir, embedded_texts, load_tokenizer
embedded_texts('train'); load_tokenizer('embedded'); print(cache_dir())")
rm -rf $B/cache/embedded $B/cache/tokenizers
cp -r "$CACHE/embedded" "$CACHE/tokenizers" $B/cache/
du -sh $B/wheels $B/cache
