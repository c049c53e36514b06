#!/usr/bin/env python3
"""Lists the models through the local backend every 0.2 s until /run/rotation-loop.stop exists, and
writes what it saw to /run/rotation-loop.json (bounded: at most 30 minutes of requests).

Counted apart: answers (by status), answers in which a GPU host refused the token (unauthorized),
and requests the backend could not take because it was restarting (step 2 restarts it)."""

import json
import os
import time
import urllib.error
import urllib.request

URL = "http://127.0.0.1:8000/config/models?refresh=true"
STOP, OUT = "/run/rotation-loop.stop", "/run/rotation-loop.json"
counts = {"sent": 0, "status": {}, "unauthorized": 0, "stale_hosts": 0, "backend_down": 0, "examples": [],
          "done": False}


def save():
    with open(OUT + ".tmp", "w") as fh:
        json.dump(counts, fh)
    os.replace(OUT + ".tmp", OUT)


deadline = time.monotonic() + 1800
while not os.path.exists(STOP) and time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            status, body = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, body = e.code, {}
    except OSError:
        counts["backend_down"] += 1
        time.sleep(0.2)
        continue
    counts["sent"] += 1
    counts["status"][str(status)] = counts["status"].get(str(status), 0) + 1
    hosts = body.get("hosts") or {}
    refused = [h for h, s in hosts.items() if s.get("reason") == "unauthorized"]
    counts["unauthorized"] += bool(refused)
    counts["stale_hosts"] += sum(1 for s in hosts.values() if s.get("stale"))
    if (status != 200 or refused) and len(counts["examples"]) < 5:
        counts["examples"].append({"status": status, "hosts": hosts})
    if counts["sent"] % 10 == 0:
        save()
    time.sleep(0.2)
counts["done"] = True
save()
