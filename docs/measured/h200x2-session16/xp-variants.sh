#!/bin/bash
# scratch experiment: APTMoE S8 G0.3 capped 2 GPUs, variants of the CPU job
set -u
CFG="--is_moe=True --model_config=S --num_layers 8 --num_stages 4 --num_experts 8 --gini 0.3 --batch_size 32 --num_chunks 4 --seq_length 128 --gpus 2 --topo C1+G2 --link-bandwidth 8 --num_warmup_steps 1 --num_training_steps 6 --no-plot -q"
mkdir -p /tmp/xp
timeout 100 aptmoe-run $CFG --pipeline APTMoE,Mobius --out /tmp/xp/base
XP_ACT_NATIVE=1 timeout 80 aptmoe-run $CFG --pipeline APTMoE --out /tmp/xp/actnative
XP_NO_COMPUTE=1 timeout 80 aptmoe-run $CFG --pipeline APTMoE --out /tmp/xp/nocompute
XP_ACT_NATIVE=1 XP_NO_COMPUTE=1 timeout 80 aptmoe-run $CFG --pipeline APTMoE --out /tmp/xp/both
timeout 100 aptmoe-run $CFG --pipeline APTMoE,Mobius --out /tmp/xp/base2
for d in base actnative nocompute both base2; do python3 -c "
import json,sys; r=json.load(open('/tmp/xp/$d/results.json'))
print('$d', {n: round(s['iteration_s'],4) for n,s in r['schedules'].items()})"; done
python3 -P -m aptmoe.sim.host_calls /tmp/xp/base /tmp/xp/actnative /tmp/xp/nocompute /tmp/xp/both /tmp/xp/base2 --landings fe
cd /tmp && tar czf $OUT/xp.tar.gz xp/*/results.json xp/*/trace-*.json
