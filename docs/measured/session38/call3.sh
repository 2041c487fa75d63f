# session 38, call 3 (the machine of call 2, warm): a fresh one-GPU cell, held back: S8x8 native
# G 0.55, three runs a schedule, planned with h200-1gpu as shipped; then, in what time is left, the
# own-calls probe at MoE-M's widths (one run, kept: are the issuing thread's calls beside a copy with
# Adam as slow there as at MoE-S's, 3.6x?)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
MATRIX_PROFILE=h200-1gpu MATRIX_DIR=runs/v27s-1gpu MATRIX_DEADLINE=20 MATRIX_STOP=300 \
  MATRIX_FLAGS="--models S:8:8:8 --gini 0.55 --links native --gpus 1 --steps 6 --repeats 3 --held-back-every 1 --no-plot -q" \
  scripts/gpu-jobs "$OUT" matrix
mv "$OUT/matrix.tar.gz" "$OUT/matrix-s.tar.gz"; mv "$OUT/matrix.log" "$OUT/matrix-s.log"
echo "S done at $((SECONDS-t0)) s"
left=$((370-(SECONDS-t0)))
if [ $left -gt 60 ]; then
  export PYTHONPATH=/tmp/aptmoe-site${PYTHONPATH:+:$PYTHONPATH}
  timeout $left python3 -P - <<'PY' > "$OUT/own-calls-m.log" 2>&1
from pathlib import Path
from aptmoe.calibration import own_calls
from aptmoe.calibration.dispatch import _probe, run_on_gpus
flags = {"num_layers": 12, "num_stages": 4, "num_experts": 8, "gini": 0.45, "batch_size": 32, "num_chunks": 4,
         "seq_length": 128, "pipeline": "Mobius,GPipeOffload", "num_warmup_steps": 1, "num_training_steps": 6}
traces = run_on_gpus(_probe(flags, "M"), "the own-calls probe at MoE-M widths ({gpus} GPU)", own_calls.SCHEDULES,
                     keep=Path("/tmp/own-calls-m/run-1"))
own_calls.own_calls_from_traces(traces, what="the own-calls probe at MoE-M widths")
PY
  tar czf "$OUT/own-calls-m.tar.gz" -C /tmp own-calls-m
  echo "own-calls M done at $((SECONDS-t0)) s"; tail -3 "$OUT/own-calls-m.log"
fi
echo "all done at $((SECONDS-t0)) s"; ls -la "$OUT"
