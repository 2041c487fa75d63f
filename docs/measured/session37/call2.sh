# session 37, call 2: two fresh one-GPU cells, held back, planned and to be predicted with h200-1gpu
# as shipped after session 37 (the own-calls factors of call 1 and the dispatch pooled over 18 eager
# probe runs): S8x8 native G 0.65 and M4x8 capped G 0.5, three runs a schedule
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v25s-1gpu MATRIX_DEADLINE=60 MATRIX_STOP=330 \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.65 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" machine matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
echo "S done at $((SECONDS-t0)) s"
left=$((560-(SECONDS-t0)))
if [ $left -gt 200 ]; then
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v25m-1gpu MATRIX_DEADLINE=30 MATRIX_STOP=$((left-15)) \
    MATRIX_FLAGS="--models M:4:4:8 --gini 0.5 --links 8 --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-m.log"
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
