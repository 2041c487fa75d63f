# session 35, call 4: the policy part again on another lease (its spread), and CPU experts beside the issuing thread on one GPU
set -u
export APTMOE_COMMIT=${1:-unknown} PYTHONUNBUFFERED=1
scripts/gpu-jobs "$OUT" neighbours
{ for i in 1 2 3; do
    aptmoe-calibrate --out /tmp/pol-$i.json -q --skip links,gpu,cpu,adam,dispatch,memory,p2p,tolls,pacer,cpujob >/dev/null 2>&1
    python3 -P -c "import json,sys; d=json.load(open('/tmp/pol-$i.json'))['policy_host']; print('pass $i loop', d['loop_s'], {k: {c: round(v*1e6,1) for c,v in s.items()} for k,s in d['seconds'].items()})"
  done; } >"$OUT/policy.log" 2>&1
cat "$OUT/policy.log"; tail -25 "$OUT/neighbours.log"
