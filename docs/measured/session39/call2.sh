# session 39, call 2: a layer's GPU work between its blocks (python -m aptmoe.calibration.glue,
# S, M and L widths, 8 experts, fp32) onto h200-1gpu; then a fresh one-GPU cell, held back:
# M4x8 capped 8 GB/s G 0.6, three runs a schedule, planned with h200-1gpu as shipped at 8011f52
# (the glue changes no plan)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
export PYTHONPATH=/tmp/aptmoe-site${PYTHONPATH:+:$PYTHONPATH}
timeout 200 python3 -P -m aptmoe.calibration.glue --models S,M,L --experts 8 --dtypes fp32 \
  --onto h200-1gpu --out "$OUT/h200-1gpu.json" > "$OUT/glue.log" 2>&1
echo "glue rc $? at $((SECONDS-t0)) s"; cat "$OUT/glue.log"
left=$((585-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v23c-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models M:4:4:8 --gini 0.6 --links 8 --gpus 1 --steps 3 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v11-fresh docs/validation-h200-v12-fresh docs/validation-h200-v20-fresh" \
  scripts/gpu-jobs "$OUT" matrix
echo "all done at $((SECONDS-t0)) s"; tail -3 "$OUT/matrix.log"; ls -la "$OUT"
