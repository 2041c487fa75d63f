# session 42, call 2: two fresh held-back cells, planned and judged with h200-1gpu as shipped after
# call 1 (its new loss and embedding curves): M4x8 capped at G 0.55, then S8x8 capped at G 0.65,
# each only where the stored cells like it say it ends in the time left
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
left=$((575-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v28m-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models M:4:4:8 --gini 0.55 --links 8 --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v12-fresh docs/validation-h200-v20-fresh docs/validation-h200-v23-fresh docs/validation-h200-v25-fresh" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.log" "$OUT/matrix-m.log" 2>/dev/null; mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz" 2>/dev/null
left=$((575-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v28s-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.65 --links 8 --gpus 1 --steps 3,S=6 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v12-fresh docs/validation-h200-v19-fresh docs/validation-h200-v21-fresh" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.log" "$OUT/matrix-s.log" 2>/dev/null; mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz" 2>/dev/null
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
