# session 42, call 1: the one-GPU profile's missing and lease figures, then a fresh held-back cell
#  - glue: the GPU curves of kinds c, l and m (the loss and the embedding, never timed) at S, M, L
#  - probe: the executor's dispatch probe, eager, 3 runs kept (to pool into h200-1gpu's dispatch)
#  - lease-adam: this lease's CPU Adam (to pool into h200-1gpu's adam figures)
#  - one fresh cell, S8x8 capped at G 0.3, planned and judged with h200-1gpu as shipped, only where
#    the stored cells like it say it ends in the time left (held back: no decision reads it)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
HOST_PROFILE=h200-1gpu GLUE_MODELS=S,M,L scripts/gpu-jobs "$OUT" glue
PROBE_REPEATS=3 PROBE_SIZES=" " scripts/gpu-jobs "$OUT" probe
HOST_PROFILE=h200-1gpu scripts/gpu-jobs "$OUT" lease-adam
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
# the device returns at most 8 files: the calibrations and their logs in one tar
(cd "$OUT" && tar czf cal.tar.gz glue.log h200-1gpu.json probe.log lease-adam.log lease-adam.json \
  h200-1gpu-lease.json machine.txt 2>/dev/null && rm -f glue.log h200-1gpu.json probe.log lease-adam.log \
  lease-adam.json h200-1gpu-lease.json machine.txt)
left=$((570-(SECONDS-t0)))
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v27s-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.3 --links 8 --gpus 1 --steps 3,S=6 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v12-fresh docs/validation-h200-v19-fresh docs/validation-h200-v21-fresh" \
  scripts/gpu-jobs "$OUT" matrix
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
