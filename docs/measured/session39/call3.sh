# session 39, call 3: a fresh one-GPU cell, held back, planned and judged with h200-1gpu as
# shipped at c4bc82a (with the layer glue curves): L2x8 native G 0.5 (session 38's lost cell),
# three runs a schedule; it starts only where the stored L cells say it ends in time
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
left=$((575-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v24-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models L:2:2:8 --gini 0.5 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v11-fresh docs/validation-h200-v14-fresh" \
  scripts/gpu-jobs "$OUT" matrix
echo "all done at $((SECONDS-t0)) s"; tail -3 "$OUT/matrix.log"; ls -la "$OUT"
