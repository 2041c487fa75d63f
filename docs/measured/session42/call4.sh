# session 42, call 4: on call 2's and 3's lease, still warm, with the device time left: the dispatch
# probe (3 eager runs, kept) and this lease's CPU Adam, for the next pool of h200-1gpu's figures
HOST_PROFILE=h200-1gpu PROBE_REPEATS=3 PROBE_SIZES=" " scripts/gpu-jobs "$OUT" probe lease-adam 2>&1 | tail -8
