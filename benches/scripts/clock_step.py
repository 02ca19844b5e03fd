#!/usr/bin/env python3
"""The clock steps of clock_step.sh, and what a few probe sessions see.

    clock_step.py OFFSET_FILE GATEWAY DATA_DIR URL OUT_JSON

The node runs under libfaketime reading its wall-clock offset (seconds)
from OFFSET_FILE; this script writes that file on a schedule (the machine's
clock is never touched) while loadgen loads the node, and meanwhile:

- alice sends to bob every 100 ms: the Sent frames (seq, server timestamp)
  and what bob receives tell whether sequences stay strictly increasing and
  whether server timestamps follow the step;
- dave holds a session whose token expires 10 minutes after it was minted:
  the forward step of an hour must close it with 4001 (token expired);
- a fresh token is tried at each offset: refused (401) when the node's clock
  is past its `exp` or more than the leeway before its `nbf`;
- carol touches her send bucket before a backward step, empties it after
  it and sends again 3 s later: a bucket that waits for the clock to come
  back refuses her for the length of the step.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import courier_client as cc  # noqa: E402

offset_file, gateway, data_dir, url, out_json = sys.argv[1:6]
HOUR = 3600
# (seconds after start, offset in seconds): forward an hour, back, back an
# hour, forward again.
SCHEDULE = [(15, HOUR), (30, 0), (45, -HOUR), (60, 0)]
END_S = 75


def token(user, ttl=86400):
    cmd = [gateway, "token", "--user", user, "--data-dir", data_dir, "--ttl", str(ttl)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def set_offset(seconds):
    with open(offset_file + ".tmp", "w") as f:
        f.write(f"{seconds:+d}\n")
    os.replace(offset_file + ".tmp", offset_file)


async def try_connect(tok):
    try:
        c = await cc.Client.connect(tok, url)
        await c.close()
        return "accepted"
    except Exception as e:  # the refusal's status is in the message
        return type(e).__name__ + ": " + str(e)[:80]


async def main():
    t0 = time.monotonic()
    now = lambda: time.monotonic() - t0  # noqa: E731
    result = {"steps": [], "sent": [], "received": [], "fresh_tokens": [], "dave": None,
              "carol": {}}
    alice = await cc.Client.connect(token("alice"), url)
    bob = await cc.Client.connect(token("bob"), url)
    carol = await cc.Client.connect(token("carol"), url)
    dave = await cc.Client.connect(token("dave", ttl=600), url)
    for c in (alice, bob, carol, dave):
        await c.sync()
    conv = cc.direct_conversation("alice", "bob")
    carol_conv = cc.direct_conversation("carol", "bob")

    async def alice_sends():
        while now() < END_S:
            try:
                s = await alice.send(conv, b"probe", timeout=10)
                result["sent"].append([round(now(), 2), s.seq, s.timestamp_ms])
            except cc.CourierError as e:
                result["sent"].append([round(now(), 2), None, e.code])
            await asyncio.sleep(0.1)

    async def bob_receives():
        while now() < END_S + 3:
            try:
                f = await bob.recv(timeout=1)
            except asyncio.TimeoutError:
                continue
            if isinstance(f, cc.Message) and f.conversation == conv:
                result["received"].append([f.seq, f.timestamp_ms])

    async def dave_waits():
        try:
            while True:
                await dave.recv(timeout=END_S)
        except Exception:
            pass
        result["dave"] = {"closed_at_s": round(now(), 2),
                          "code": dave.ws.close_code, "reason": dave.ws.close_reason}

    async def steps():
        for at, offset in SCHEDULE:
            await asyncio.sleep(max(0, at - 5 - now()))
            if offset == -HOUR:
                # Carol's bucket is touched just before the backward step.
                await carol.send(carol_conv, b"before")
            await asyncio.sleep(max(0, at - now()))
            set_offset(offset)
            result["steps"].append([round(now(), 2), offset])
            await asyncio.sleep(2.5)  # libfaketime reads the file each second
            result["fresh_tokens"].append([offset, await try_connect(token("erin"))])
            if offset == -HOUR:
                refused = 0
                for _ in range(150):
                    try:
                        await carol.send(carol_conv, b"burst")
                    except cc.CourierError as e:
                        refused += e.code == 429
                result["carol"]["burst_refused"] = refused
                await asyncio.sleep(3)
                later = 0
                for _ in range(20):
                    try:
                        await carol.send(carol_conv, b"later")
                    except cc.CourierError as e:
                        later += e.code == 429
                    await asyncio.sleep(0.05)
                result["carol"]["refused_of_20_three_s_later"] = later

    await asyncio.gather(alice_sends(), bob_receives(), dave_waits(), steps())
    set_offset(0)
    seqs = [s for _, s, _ in result["sent"] if s is not None]
    ts = [t for _, s, t in result["sent"] if s is not None]
    got = [s for s, _ in result["received"]]
    summary = {
        "probe_sent": len(seqs),
        "probe_refused": sum(1 for _, s, _ in result["sent"] if s is None),
        "seq_strictly_increasing": all(b > a for a, b in zip(seqs, seqs[1:])),
        "received_in_order": all(b > a for a, b in zip(got, got[1:])),
        "received_all": set(seqs) <= set(got),
        "timestamp_steps_back": sum(1 for a, b in zip(ts, ts[1:]) if b < a),
        "largest_timestamp_step_ms": max((b - a for a, b in zip(ts, ts[1:])), default=0),
        "largest_timestamp_step_back_ms": max((a - b for a, b in zip(ts, ts[1:])), default=0),
        "dave": result["dave"],
        "fresh_tokens": result["fresh_tokens"],
        "carol": result["carol"],
        "steps": result["steps"],
    }
    json.dump({"summary": summary, **result}, open(out_json, "w"))
    print(json.dumps(summary, indent=1))


asyncio.run(main())
