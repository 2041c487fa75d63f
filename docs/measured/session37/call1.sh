# session 37, call 1: the executor's own calls beside Adam and a native copy with it on a one-GPU
# lease (the own-calls probe, 3 runs, off the grid) put onto h200-1gpu; the dispatch probe, eager,
# 5 runs; then a fresh cell, held back (S8x8 capped G 0.5, three runs a schedule), predicted later
# with the profile those probes make (nothing of the cell goes into it)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
HOST_PROFILE=h200-1gpu OWN_CALLS_REPEATS=3 scripts/gpu-jobs "$OUT" machine own-calls
echo "own-calls done at $((SECONDS-t0)) s"
PROBE_REPEATS=5 PROBE_SIZES=" " timeout 150 scripts/gpu-jobs "$OUT" probe
echo "probe done at $((SECONDS-t0)) s"
left=$((575-(SECONDS-t0)))
if [ $left -gt 280 ]; then
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v24s-1gpu MATRIX_DEADLINE=30 MATRIX_STOP=$((left-10)) \
    MATRIX_FLAGS="--models S:8:8:8 --gini 0.5 --links 8 --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
