# session 35, call 1: the policy's host time on this lease, and the wake fix A/B (base = HEAD before it)
set -u
export APTMOE_COMMIT=${1:-unknown} PYTHONUNBUFFERED=1
scripts/gpu-jobs "$OUT" machine
pip install -q --no-deps --no-index --target /tmp/aptmoe-site .whl/simpy-*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/aptmoe-site
t0=$SECONDS
{ for i in 1 2 3; do
    aptmoe-calibrate --out /tmp/pol-$i.json -q --skip links,gpu,cpu,adam,dispatch,memory,p2p,tolls,pacer,cpujob >/dev/null 2>&1
    python3 -P -c "import json,sys; d=json.load(open('/tmp/pol-$i.json'))['policy_host']; print('pass $i loop', d['loop_s'], {k: {c: round(v*1e6,1) for c,v in s.items()} for k,s in d['seconds'].items()})"
  done; cp /tmp/pol-2.json "$OUT/policy-host.json"; } >"$OUT/policy.log" 2>&1
echo "policy done at $((SECONDS-t0)) s"
# which tree each arm imports
PYTHONPATH=.ab/base:/tmp/aptmoe-site python3 -P -c "import aptmoe.policy as p, aptmoe.exec.cli as c; print('base', p.__file__, c.__file__, hasattr(p.AptmoePolicy, '_wake_if_queued'))"
python3 -P -c "import aptmoe.policy as p, aptmoe.exec.cli as c; print('new', p.__file__, c.__file__, hasattr(p.AptmoePolicy, '_wake_if_queued'))"
RUN="--is_moe=True --model_config=S --num_layers 8 --num_stages 8 --num_experts 8 --gini 0.45 --gpus 1 --topo C1+G1 --pipeline APTMoE,Mobius --batch_size 32 --num_chunks 4 --seq_length 128 --num_warmup_steps 1 --num_training_steps 6 --device auto --kernel-loading eager --calibration h200-1gpu --no-plot -q"
mkdir -p /tmp/ab
arm() { # $1 name, $2 PYTHONPATH
  PYTHONPATH=$2 timeout 150 python3 -P -m aptmoe.exec.cli $RUN --out /tmp/ab/$1 >/tmp/ab/$1.log 2>&1
  echo "$1 rc $? at $((SECONDS-t0)) s: $(python3 -P -c "import json; d=json.load(open('/tmp/ab/$1/results.json'))['schedules']; print({k: round(v['iteration_s'],4) for k,v in d.items()})" 2>&1)"
}
for r in 1 2 3; do
  [ $((SECONDS-t0)) -gt 430 ] && break
  if [ $r = 2 ]; then arm new-$r /tmp/aptmoe-site; arm base-$r .ab/base:/tmp/aptmoe-site
  else arm base-$r .ab/base:/tmp/aptmoe-site; arm new-$r /tmp/aptmoe-site; fi
done 2>&1 | tee "$OUT/ab.log"
{ echo; python3 -P -m aptmoe.sim.host_calls /tmp/ab/*/ --budget --gaps f 2>&1; } >>"$OUT/ab.log"
rm -f /tmp/ab/*/params-* /tmp/ab/*/torch-*
tar cJf "$OUT/ab.tar.xz" -C /tmp ab
ls -la "$OUT"
