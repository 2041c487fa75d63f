# session 42, call 3: one fresh held-back cell, L2x8 native at G 0.6, planned and judged with
# h200-1gpu as shipped after call 1, only where the stored L cells say it ends in the time left
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
left=$((540-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v29l-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models L:2:2:8 --gini 0.6 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v11-fresh docs/validation-h200-v24-fresh" \
  scripts/gpu-jobs "$OUT" matrix
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
