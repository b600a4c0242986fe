#!/usr/bin/env bash
# Train the three embedded models back to back, then measure them (one H100 call).
#
#   bash training/device_train_all.sh OUTDIR
#
# Budgets (seconds of training loop each) can be overridden: CLF_SECONDS, DIT_SECONDS,
# MMDIT_SECONDS; CLF_ARGS, DIT_ARGS, MMDIT_ARGS and EVAL_ARGS add arguments (CPU smoke runs). Weights land in
# ditlens/zoo/weights/, run records in training/records/; OUTDIR receives one tar per model
# (written as soon as it is trained), the evaluation JSON, the sample grids and the log.
set -u -o pipefail
out=${1:?usage: device_train_all.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$log"

stage() {  # stage NAME TAR_PATHS... -- COMMAND...
  local name=$1; shift
  local paths=()
  while [[ $1 != -- ]]; do paths+=("$1"); shift; done; shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tr '\r' '\n' | grep -v -E 'it/s\]$|s/it\]$' | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [[ $rc -eq 0 ]] && tar cf "$out/$name.tar" "${paths[@]}"
  return 0
}

stage classifier ditlens/zoo/weights/classifier training/records/classifier.json -- \
  python3 -m training.train_classifier --max-seconds "${CLF_SECONDS:-40}" ${CLF_ARGS:-}
stage tiny-dit ditlens/zoo/weights/tiny-dit training/records/tiny-dit.json -- \
  python3 -m training.train_tiny_dit --max-seconds "${DIT_SECONDS:-150}" ${DIT_ARGS:-}
stage tiny-mmdit ditlens/zoo/weights/tiny-mmdit training/records/tiny-mmdit.json -- \
  python3 -m training.train_tiny_mmdit --compile --lr-decay cosine --max-seconds "${MMDIT_SECONDS:-330}" ${MMDIT_ARGS:-}
mkdir -p "$out/eval"
stage evaluation -- \
  timeout "${EVAL_TIMEOUT:-80}" python3 -m training.evaluate_zoo --device "${EVAL_DEVICE:-cuda}" --out "$out/eval/zoo_metrics.json" \
  --grid-dir "$out/eval" ${EVAL_ARGS:-}
echo "total $SECONDS s" | tee -a "$log"
