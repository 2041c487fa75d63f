# session 40, call 1: where the CPU Adam's process-to-process spread comes from: probe_adam.py
# (placements of the Adam pool, fresh processes), then the executor's M4x8 native G 0.5 cell's
# GPipeOffload and Mobius, three runs each, with torch's CPU allocator asking for huge pages
# (THP_MEM_ALLOC_ENABLE=1) and without, while time is left
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps --no-index . > /tmp/install.log 2>&1 || cp /tmp/install.log "$OUT/"
pip install -q --no-deps --no-index --target /tmp/site .whl/simpy-*.whl >> /tmp/install.log 2>&1
export PYTHONPATH=/tmp/site
{ nproc; lscpu; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag;
  grep -i huge /proc/meminfo; numactl -H 2>&1 | head; free -g;
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv; } > "$OUT/sysinfo.txt" 2>&1
grep -i "model name\|numa\|\[\|AnonHuge\|L3" "$OUT/sysinfo.txt"
python3 probe_adam.py "$OUT" --rounds 6 --blocks 48 2>&1 | tee "$OUT/probe.log"
echo "probe done at $((SECONDS-t0)) s"
flags="--is_moe=True --model_config=M --num_layers 4 --num_stages 4 --num_experts 8 --gini 0.5 --gpus 1 --topo C1+G1
  --pipeline GPipeOffload,Mobius --batch_size 32 --num_chunks 4 --seq_length 128 --num_warmup_steps 1
  --num_training_steps 3 --kernel-loading eager --calibration h200-1gpu --timeout 120 --no-plot -q"
mkdir -p runs
for r in 1 2 3; do
  for thp in 0 1; do
    [ $((SECONDS-t0)) -lt 520 ] || { echo "stop: time"; break 2; }
    if [ $thp = 1 ]; then export THP_MEM_ALLOC_ENABLE=1; else unset THP_MEM_ALLOC_ENABLE; fi
    aptmoe-run $flags --out runs/ab-thp$thp-r$r > runs/ab-thp$thp-r$r.log 2>&1; echo "thp $thp run $r rc $? at $((SECONDS-t0)) s"
  done
done
unset THP_MEM_ALLOC_ENABLE
tar cJf "$OUT/ab.tar.xz" runs/ab-*
echo "all done at $((SECONDS-t0)) s"
