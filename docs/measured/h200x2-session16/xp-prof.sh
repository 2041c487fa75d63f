#!/bin/bash
set -u
python3 -m pip install -q --no-build-isolation --no-deps --no-index . >/tmp/i.log 2>&1 || tail -3 /tmp/i.log
pip install -q --no-deps --no-index --target /tmp/site .whl/simpy-*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
CFG="--is_moe=True --model_config=S --num_layers 8 --num_stages 4 --num_experts 8 --gini 0.3 --batch_size 32 --num_chunks 4 --seq_length 128 --gpus 2 --topo C1+G2 --link-bandwidth 8 --num_warmup_steps 1 --num_training_steps 3 --no-plot -q"
cd /tmp
for s in APTMoE Mobius; do
  mkdir -p /tmp/tp/$s
  XP_TORCH_PROFILE=/tmp/tp/$s timeout 150 aptmoe-run $CFG --pipeline $s --out /tmp/tp/run-$s 2>&1 | grep -v USDT | tail -3
  cp /tmp/tp/run-$s/results.json /tmp/tp/$s/ 2>/dev/null; cp /tmp/tp/run-$s/trace-$s.json /tmp/tp/$s/ 2>/dev/null
done
ls -la /tmp/tp/*/
cd /tmp && tar czf $OUT/tp.tar.gz tp/APTMoE tp/Mobius
