# session 39, call 1: two fresh one-GPU cells, held back (no model change of this session has read
# them): M4x8 native G 0.3, then S8x8 native G 0.25, three runs a schedule, planned with h200-1gpu
# as shipped at 8011f52; each cell starts only where the stored cells like it say it ends in time
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
EXPECT="--expect-from docs/validation-h200-v15-fresh docs/validation-h200-v17-fresh docs/validation-h200-v21-fresh docs/validation-h200-v22-fresh"
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v23-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=320 \
  MATRIX_FLAGS="--models M:4:4:8 --gini 0.3 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q --budget-s 305 $EXPECT" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-m.log"
echo "M done at $((SECONDS-t0)) s"
left=$((585-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v23s-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.25 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) $EXPECT" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
