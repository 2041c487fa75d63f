# session 36, call 2: lazy against eager kernel loading, A B B A ..., each run its own process:
# the dispatch probe's model (6 rounds) and MoE-S8's GPipe (3 rounds); then the lease's CPU Adam.
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
scripts/gpu-jobs "$OUT" machine >/dev/null 2>&1
export PYTHONPATH=/tmp/aptmoe-site
PROBE="--is_moe=True --model_config=S --embedding_dim 16 --hidden_dim 32 --num_heads 2 --num_layers 4 --num_experts 8 --gini 0.3 --batch_size 16 --num_chunks 4 --seq_length 32 --pipeline GPipe --num_warmup_steps 1 --num_training_steps 3"
S8="--is_moe=True --model_config=S --num_layers 8 --num_experts 8 --gini 0.4 --batch_size 32 --num_chunks 4 --seq_length 128 --pipeline GPipe --num_warmup_steps 1 --num_training_steps 6"
GPU="--device cuda --gpus 1 --topo C1+G1"
python3 -P -m aptmoe.exec.ab --rounds 6 --a="--kernel-loading lazy" --b="--kernel-loading eager" --out /tmp/kl/probe -- $PROBE $GPU >"$OUT/kl.log" 2>&1
echo "probe done at $((SECONDS-t0)) s" >>"$OUT/kl.log"
python3 -P -m aptmoe.exec.ab --rounds 3 --a="--kernel-loading lazy" --b="--kernel-loading eager" --out /tmp/kl/s8 -- $S8 $GPU >>"$OUT/kl.log" 2>&1
echo "s8 done at $((SECONDS-t0)) s" >>"$OUT/kl.log"
( cd /tmp && find kl -name "trace-*.json" -exec xz -T4 {} \; ; tar cf "$OUT/kl.tar" --exclude="*.png" kl )
if [ $((SECONDS-t0)) -lt 420 ]; then HOST_PROFILE=h200-1gpu scripts/gpu-jobs "$OUT" lease-adam >>"$OUT/kl.log" 2>&1; fi
echo "all done at $((SECONDS-t0)) s" >>"$OUT/kl.log"; ls -la "$OUT"
