# session 40, call 2: the wake probe with the waker's latency (calibration/wake.py), then two
# fresh one-GPU cells, held back, planned and judged with h200-1gpu as shipped (no model change
# this session): M4x8 capped G 0.4, then S8x8 native G 0.7 where the stored cells say it ends in time
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
python3 -P -m aptmoe.calibration.wake --device cuda 2>&1 | tee "$OUT/wake.log"
left=$((585-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v25-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models M:4:4:8 --gini 0.4 --links 8 --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v12-fresh docs/validation-h200-v20-fresh docs/validation-h200-v23-fresh" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.log" "$OUT/matrix-m.log" 2>/dev/null; mv "$OUT/matrix.tar.gz" "$OUT/matrix-m.tar.gz" 2>/dev/null
left=$((585-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v25s-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.7 --links native --gpus 1 --steps 3,S=6 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v20-fresh docs/validation-h200-v22-fresh docs/validation-h200-v23-fresh" \
  scripts/gpu-jobs "$OUT" matrix
echo "all done at $((SECONDS-t0)) s"; tail -3 "$OUT"/matrix*.log; ls -la "$OUT"
