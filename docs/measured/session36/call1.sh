# session 36, call 1: does eager kernel loading (the matrix's) slow the issuing thread's block calls
# against lazy (the dispatch probe's)? The probe's model and MoE-S8's GPipe, lazy and eager
# alternated (ABBA), each its own process; then the lease's CPU Adam.
# (As run. The S8 runs were refused: GPipe takes one stage a GPU, and $S8 asked for 8. Call 2
# runs them without --num_stages.)
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
export PYTHONPATH=/tmp/aptmoe-site
PROBE="--is_moe=True --model_config=S --embedding_dim 16 --hidden_dim 32 --num_heads 2 --num_layers 4 --num_experts 8 --gini 0.3 --batch_size 16 --num_chunks 4 --seq_length 32 --pipeline GPipe --num_warmup_steps 1 --num_training_steps 3"
S8="--is_moe=True --model_config=S --num_layers 8 --num_stages 8 --num_experts 8 --gini 0.4 --batch_size 32 --num_chunks 4 --seq_length 128 --pipeline GPipe --num_warmup_steps 1 --num_training_steps 6"
run() {  # name mode flags...
  local name=$1 mode=$2; shift 2
  python3 -P -m aptmoe.exec.cli "$@" --device cuda --gpus 1 --topo C1+G1 --no-plot -q --kernel-loading "$mode" \
    --out "/tmp/kl/$name-$mode" >>"$OUT/kl.log" 2>&1
  python3 -P - "/tmp/kl/$name-$mode" <<'PY' >>"$OUT/kl.log" 2>&1
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))["schedules"]["GPipe"]
print(sys.argv[1], "step %.4f" % r["iteration_s"], "loop", r["host_loop_s"], r["kernel_loading"])
PY
  echo "$name-$mode done at $((SECONDS-t0)) s" >>"$OUT/kl.log"
}
i=0
for order in "lazy eager" "eager lazy" "lazy eager" "eager lazy"; do
  i=$((i+1))
  for m in $order; do run "probe-$i" "$m" $PROBE; done
  for m in $order; do run "s8-$i" "$m" $S8; done
  [ $((SECONDS-t0)) -gt 330 ] && break
done
( cd /tmp && find kl -name "trace-*.json" -exec xz -T4 {} \; ; tar cf "$OUT/kl.tar" --exclude="*.png" kl )
if [ $((SECONDS-t0)) -lt 420 ]; then HOST_PROFILE=h200-1gpu scripts/gpu-jobs "$OUT" lease-adam >>"$OUT/kl.log" 2>&1; fi
echo "all done at $((SECONDS-t0)) s" >>"$OUT/kl.log"; ls -la "$OUT"
