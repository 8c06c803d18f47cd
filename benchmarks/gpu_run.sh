#!/usr/bin/env bash
# GPU evidence in one run (issue 20), from the repository root on a bare GPU machine without network:
#   bash benchmarks/gpu_run.sh [--dry-run] [--out DIR]
# Installs the carried wheels (.gpu_bundle/wheels, made by benchmarks/gpu_bundle.sh) and the project itself with
# --no-deps and without constraints.txt (the image keeps its own torch / transformers / accelerate), disables wandb,
# points the data cache at the carried corpus and tokenizer, runs benchmarks/gpu_run.py, and packs every result and
# the run record into one archive, DIR/gpu_results.tar.gz (DIR defaults to $OUT, the device tool's return folder).
# --dry-run: every step on the CPU at tiny sizes except the wheel install.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; DEST=${OUT:-gpu_out}
while [ $# -gt 0 ]; do
  case $1 in --dry-run) DRY=1;; --out) DEST=$2; shift;; *) echo "usage: $0 [--dry-run] [--out DIR]" >&2; exit 2;; esac
  shift
done
PY=${PYTHON:-python3}
mkdir -p "$DEST"; DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d); RES=$WORK/gpu_results; mkdir -p "$RES"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ -d .gpu_bundle/cache ] && export CONCEPT_NB_CACHE=$PWD/.gpu_bundle/cache
if [ $DRY = 1 ]; then
  echo "dry run: skipping the wheel and project install"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  if ls .gpu_bundle/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu_bundle/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . || exit 1
  $PY -m pip list 2>/dev/null > "$RES/pip_list.txt"
fi
$PY benchmarks/gpu_run.py --out "$RES" $([ $DRY = 1 ] && echo --dry-run); rc=$?
# the run record without weights, checkpoints or tokenizer (what runs/ commits; each file back is <= 16 MiB)
tar czf "$DEST/gpu_results.tar.gz" --exclude=checkpoints --exclude=model -C "$WORK" gpu_results
cp "$RES/summary.md" "$DEST/" 2>/dev/null
echo "packed $DEST/gpu_results.tar.gz (exit $rc)"
rm -rf "$WORK"
exit $rc
