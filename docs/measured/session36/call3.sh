# session 36, call 3: two fresh one-GPU cells, held back (nothing measured on this lease goes into a profile):
# S8x8 native G 0.35 and M4x8 native G 0.55, three runs a schedule
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v22s-1gpu MATRIX_DEADLINE=60 MATRIX_STOP=320 \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.35 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" machine matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
echo "S done at $((SECONDS-t0)) s"
left=$((550-(SECONDS-t0)))
if [ $left -gt 250 ]; then
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v22m-1gpu MATRIX_DEADLINE=30 MATRIX_STOP=$((left-15)) \
    MATRIX_FLAGS="--models M:4:4:8 --gini 0.55 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-m.log"
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
