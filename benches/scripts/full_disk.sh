#!/usr/bin/env bash
# Fault injection, full disk (issue 9): the node's store on a small tmpfs
# that the traffic fills. While it is full every send must be refused with
# 503 (never a false SENT), nothing acked may be lost, and once the volume
# grows again (the operator freeing space) the node must carry on without a
# restart. Needs root (it mounts and remounts its own tmpfs, and removes it).
source "$(dirname "$0")/common.sh"
MNT=${MNT:-$(mktemp -d)}
[ "${NO_BUILD:-0}" = 1 ] || build
mount -t tmpfs -o size=20m tmpfs "$MNT"
trap 'stop_gateway; umount "$MNT" 2>/dev/null; rmdir "$MNT" 2>/dev/null' EXIT
start_gateway "$MNT/data"
echo "== filling the 20 MiB volume (8 KB bodies at 1,000/s)"
"$LOADGEN" --data-dir "$MNT/data" --connections 200 --rate 1000 --duration 10s --body-bytes 8000 \
    --drain 3s --threshold "lost == 0" --report "$OUT/full-disk-filling.json" --quiet
df -h "$MNT" | tail -1
echo "== the volume grows to 80 MiB; the same node carries on"
mount -o remount,size=80m "$MNT"
"$LOADGEN" --data-dir "$MNT/data" --connections 200 --rate 200 --duration 10s --seed 7 \
    --drain 3s --threshold "lost == 0" --threshold "unacked == 0" \
    --report "$OUT/full-disk-recovered.json" --quiet
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a = json.load(open(f"{out}/full-disk-filling.json"))
b = json.load(open(f"{out}/full-disk-recovered.json"))
print(f"while filling: sent {a['sent']}, acked {a['acked']}, refused with 503 "
      f"{a['errors'].get('error.store_unavailable', 0)} times, lost {a['lost']}, "
      f"duplicates {a['duplicates']}, reordered {a['reordered']}")
print(f"after growing: sent {b['sent']}, acked {b['acked']}, lost {b['lost']}, unacked {b['unacked']}")
PY
