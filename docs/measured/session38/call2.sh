# session 38, call 2: the CPU worker's time between Adam chunks on a one-GPU lease (the CPU-job
# probe, three runs, kept), then a fresh one-GPU cell, held back: M4x8 native G 0.45, three runs a
# schedule, planned with h200-1gpu as shipped (the gaps change no plan)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
HOST_PROFILE=h200-1gpu ADAM_GAPS_REPEATS=3 ADAM_GAPS_TIMEOUT=240 scripts/gpu-jobs "$OUT" machine adam-gaps
echo "gaps done at $((SECONDS-t0)) s"; tail -5 "$OUT/adam-gaps.log"
left=$((575-(SECONDS-t0)))
if [ $left -gt 300 ]; then
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v27m-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$((left-10)) \
    MATRIX_FLAGS="--models M:4:4:8 --gini 0.45 --links native --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-m.log"
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
