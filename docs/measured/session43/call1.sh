# session 43, call 1: the same cell twice on one lease, as the matrix measures it (each schedule 3
# runs, the median kept): S8x8 native at G 0.55, v12-fresh's and v22-fresh's config (v22-fresh ran
# today's executor code for every schedule). How far apart the same config's measured medians land
# is the floor under any one prediction's worst error. Planned and judged with h200-1gpu as shipped
# (no model or profile change this session before these runs are read: held back).
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
for rep in a b; do
  left=$((580-(SECONDS-t0)))
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v29$rep-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=$left \
    MATRIX_FLAGS="--models S:8:8:8 --gini 0.55 --links native --gpus 1 --steps 3,S=6 --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from docs/validation-h200-v12-fresh docs/validation-h200-v22-fresh docs/validation-h200-v26-fresh" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.log" "$OUT/matrix-$rep.log" 2>/dev/null; mv "$OUT/matrix.tar.gz" "$OUT/matrix-$rep.tar.gz" 2>/dev/null
done
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
