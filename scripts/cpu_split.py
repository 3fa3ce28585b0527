"""Where the machine's CPU goes while the default engine drains a backlog.

One worker variant of `fraudscore bench e2e` (same simulated events, same small model)
drains N events produced beforehand; over the drain (from the first committed output to
the last) the CPU time of the broker, Redis, the worker processes and this script (the
read_committed reader) is read from /proc and printed per event, as JSON.

CPU time per event is steadier than events/s on a shared machine, so it is the figure to
compare two builds with (run the script in each checkout, alternating):

    eval "$(scripts/stack.sh up)"
    .venv/bin/python scripts/cpu_split.py --events 100000

A broker started moments ago is still compiling its hot paths (the JVM's JIT): its cost
per event falls over its first few hundred thousand messages, so discard the first run
after `stack.sh up`. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka.admin import AdminClient

from app import bench_e2e as bench

_TICK = os.sysconf("SC_CLK_TCK")


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _descendants(pid: int) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    found = [int(p) for p in kids.stdout.split()]
    return [pid] + [d for k in found for d in _descendants(k)]


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return total


def _machine() -> tuple[int, int]:
    values = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    return sum(values), values[3] + values[4]  # all, idle + iowait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--variant", default="confluent_1w", choices=["confluent_1w", "confluent_2w"])
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS",
                                                          "127.0.0.1:9092"))
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL",
                                                          "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fraudscore-cpu-") as tmp:
        ref = bench.train_model(Path(tmp) / "registry")
        stream = bench.simulate_stream(args.events, seed=21)
        admin = AdminClient({"bootstrap.servers": args.bootstrap})
        name = f"cpu-split.{uuid.uuid4().hex[:8]}"
        env = {**os.environ, **bench._keys_env(),
               "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": args.bootstrap,
               "FRAUDSCORE_REDIS_URL": args.redis_url, "FRAUDSCORE_MODEL_DIR": str(ref.path),
               "FRAUDSCORE_MODEL_RELOAD_S": "0", "FRAUDSCORE_AUDIT_SCOPE": "alerts",
               "FRAUDSCORE_LOG_LEVEL": "WARNING"}
        phase = bench._phase(args.variant, name, env, f"ns-{name}")
        topics = list(phase.topics.values())
        bench._create_topics(admin, topics, args.partitions)
        try:
            bench._produce_all(args.bootstrap, phase.topics["transactions"], stream)
            reader = bench._reader(args.bootstrap, phase.topics["scores"], args.partitions)
            proc = subprocess.Popen(bench._command(args.variant), env=phase.env,
                                    start_new_session=True)
            try:
                seen, first = 0, None
                while seen < len(stream):
                    if proc.poll() is not None:
                        raise SystemExit(f"workers exited with {proc.returncode}")
                    got = sum(1 for m in reader.consume(10_000, 0.05) if m.error() is None)
                    if got and first is None:
                        groups = {"broker": _pids("kafka.Kafka"), "redis": _pids("redis-server"),
                                  "workers": _descendants(proc.pid), "reader": [os.getpid()]}
                        first = (time.monotonic(), seen + got,
                                 {g: _cpu_s(p) for g, p in groups.items()}, _machine())
                    seen += got
                wall = time.monotonic() - first[0]
                spent = {g: _cpu_s(p) - first[2][g] for g, p in groups.items()}
                machine = _machine()
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
                reader.close()
        finally:
            bench._delete_topics(admin, topics)
            bench._drop_namespace(args.redis_url, f"ns-{name}")
    events = seen - first[1]
    ticks = machine[0] - first[3][0]
    busy = ticks - (machine[1] - first[3][1])
    print(json.dumps({
        "variant": args.variant, "events": events, "events_per_s": round(events / wall),
        "machine_busy_share": round(busy / ticks, 3), "cpus": os.cpu_count(),
        "cpu_us_per_event": {g: round(s / events * 1e6, 1) for g, s in spent.items()},
        "cores_used": {g: round(s / wall, 2) for g, s in spent.items()},
    }))


if __name__ == "__main__":
    main()
