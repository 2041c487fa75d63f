#!/bin/bash
# A/B on one lease: the tree at 1d33c30 (A, runs/old-src) against this tree (B), alternated,
# S8 G0.3 capped on 2 GPUs, APTMoE and Mobius per run; then the regime's APTMoE and Mobius once each.
set -u
python3 -m pip install -q --no-build-isolation --no-deps --no-index . >/tmp/i.log 2>&1 || tail -3 /tmp/i.log
python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/old runs/old-src >/tmp/i2.log 2>&1 || tail -3 /tmp/i2.log
pip install -q --no-deps --no-index --target /tmp/site .whl/simpy-*.whl >/dev/null 2>&1
CFG="--is_moe=True --model_config=S --num_layers 8 --num_stages 4 --num_experts 8 --gini 0.3 --batch_size 32 --num_chunks 4 --seq_length 128 --gpus 2 --topo C1+G2 --link-bandwidth 8 --num_warmup_steps 1 --num_training_steps 6 --no-plot -q --pipeline APTMoE,Mobius"
mkdir -p /tmp/ab
cd /tmp
echo "A imports $(PYTHONPATH=/tmp/old:/tmp/site python3 -c 'import aptmoe.exec.runtime as r; print(r.__file__)'), pinned up: $(grep -c 'torch.cat(backs, out=up)' /tmp/old/aptmoe/exec/runtime.py)"
echo "B imports $(PYTHONPATH=/tmp/site python3 -c 'import aptmoe.exec.runtime as r; print(r.__file__)')"
run() { # arm name
  if [ "$1" = A ]; then PYTHONPATH=/tmp/old:/tmp/site timeout 120 python3 -m aptmoe.exec.cli $CFG --out /tmp/ab/$2
  else PYTHONPATH=/tmp/site timeout 120 python3 -m aptmoe.exec.cli $CFG --out /tmp/ab/$2; fi
}
for r in ${ROUNDS:-1 2}; do
  if [ $((r % 2)) = 1 ]; then run A A$r; run B B$r; else run B B$r; run A A$r; fi
done
REG="--is_moe=True --model_config=S --num_experts=16 --gini=0.3 --topo=C1+G2 --gpus 2 --gpu-memory 40 --link-bandwidth 8 --num_warmup_steps 1 --num_training_steps 3 --no-plot -q --pipeline APTMoE,Mobius"
PYTHONPATH=/tmp/old:/tmp/site timeout 150 python3 -m aptmoe.exec.cli $REG --out /tmp/ab/regA
PYTHONPATH=/tmp/site timeout 150 python3 -m aptmoe.exec.cli $REG --out /tmp/ab/regB
for d in /tmp/ab/*/; do python3 -c "
import json,sys; r=json.load(open('$d/results.json'))
print('$(basename $d)', {n: round(s['iteration_s'],4) for n,s in r['schedules'].items()}, r['source'] if 'source' in r else '')"; done
PYTHONPATH=/tmp/site python3 -P -m aptmoe.sim.host_calls /tmp/ab/A* /tmp/ab/B* /tmp/ab/reg*
cd /tmp && tar czf $OUT/ab.tar.gz ab/*/results.json ab/*/trace-*.json
