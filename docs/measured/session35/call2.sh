# session 35, call 2: two fresh one-GPU cells with the executor after the wake fix, the lease's probe before and after
set -u
export APTMOE_COMMIT=${1:-unknown} PYTHONUNBUFFERED=1
t0=$SECONDS
PROBE_REPEATS=2 PROBE_SIZES=" " scripts/gpu-jobs "$OUT" machine probe
echo "probe done at $((SECONDS-t0)) s"
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v20s-1gpu MATRIX_DEADLINE=200 MATRIX_STOP=$((330-(SECONDS-t0))) \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.5 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
echo "S done at $((SECONDS-t0)) s"
left=$((560-(SECONDS-t0)))
if [ $left -gt 200 ]; then
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v20m-1gpu MATRIX_DEADLINE=400 MATRIX_STOP=$left \
    MATRIX_FLAGS="--models M:4:4:8 --gini 0.4 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-m.log"
fi
echo "M done at $((SECONDS-t0)) s"
[ $((SECONDS-t0)) -lt 550 ] && PROBE_REPEATS=1 PROBE_SIZES=" " scripts/gpu-jobs "$OUT" probe
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"; tail -3 "$OUT"/matrix-*.log
