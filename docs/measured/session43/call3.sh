# session 43, call 3: on call 2's lease, still warm: the S8 cell of calls 1 and 2 a fourth time,
# only where the stored cells like it say it ends in
# the time left. Held back, h200-1gpu as shipped.
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1; mv "$OUT/machine.txt" "$OUT/machine-3.txt"
run() {  # name models gini expect-from...
  local name=$1 models=$2 gini=$3 steps=$4; shift 4
  local left=$((560-(SECONDS-t0)))
  MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/$name MATRIX_DEADLINE=20 MATRIX_STOP=$left \
    MATRIX_FLAGS="--models $models --gini $gini --links native --gpus 1 --steps $steps --repeats 3 --held-back-every 1 --no-plot -q --budget-s $((left-5)) --expect-from $*" \
    scripts/gpu-jobs "$OUT" matrix
  mv "$OUT/matrix.log" "$OUT/matrix-$name.log" 2>/dev/null; mv "$OUT/matrix.tar.gz" "$OUT/matrix-$name.tar.gz" 2>/dev/null
}
run v29d-1gpu S:8:8:8 0.55 3,S=6 docs/validation-h200-v12-fresh docs/validation-h200-v22-fresh docs/validation-h200-v26-fresh
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
