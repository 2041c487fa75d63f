# session 36, call 4: a fresh one-GPU cell, held back (S8x8 native G 0.6, three runs a schedule); then
# the lease's dispatch probe, 3 runs, now eager (calibration/dispatch.py's PROBE_KERNEL_LOADING)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v23s-1gpu MATRIX_DEADLINE=60 MATRIX_STOP=330 \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.6 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" machine matrix
echo "S done at $((SECONDS-t0)) s"
if [ $((SECONDS-t0)) -lt 340 ]; then PROBE_REPEATS=3 PROBE_SIZES=" " timeout 110 scripts/gpu-jobs "$OUT" probe; fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
