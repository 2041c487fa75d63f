# session 38, call 1: two fresh one-GPU cells, held back, planned and to be predicted with h200-1gpu
# as shipped after session 37: L2x8 native G 0.5 and S8x8 native G 0.55, three runs a schedule
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v27l-1gpu MATRIX_DEADLINE=90 MATRIX_STOP=340 \
  MATRIX_FLAGS="--models L:2:2:8 --gini 0.5 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" machine matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-l.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-l.log"
echo "L done at $((SECONDS-t0)) s"
left=$((565-(SECONDS-t0)))
if [ $left -gt 200 ]; then
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v27s-1gpu MATRIX_DEADLINE=40 MATRIX_STOP=$((left-15)) \
    MATRIX_FLAGS="--models S:8:8:8 --gini 0.55 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
