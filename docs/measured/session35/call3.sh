# session 35, call 3: two more fresh one-GPU cells (the executor after the wake fix), the lease's probe before and after
set -u
export APTMOE_COMMIT=${1:-unknown} PYTHONUNBUFFERED=1
t0=$SECONDS
PROBE_REPEATS=2 PROBE_SIZES=" " MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v21s-1gpu MATRIX_DEADLINE=100 MATRIX_STOP=330 \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.4 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" machine probe matrix
mv "$OUT/probe-runs.tar" "$OUT/probe-runs-before.tar"; mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
echo "S done at $((SECONDS-t0)) s"
left=$((545-(SECONDS-t0)))
if [ $left -gt 250 ]; then
  PROBE_REPEATS=2 PROBE_SIZES=" " MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v21m-1gpu MATRIX_DEADLINE=30 MATRIX_STOP=$((left-35)) \
    MATRIX_FLAGS="--models M:4:4:8 --gini 0.55 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix probe
  mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-m.log"
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
