"""`python -m infer.bench_serve`: pdlm-serve under load and faults, on 127.0.0.1 only (prints a table, writes JSON).

For each server setting (micro-batching with --max-batch 8, and off with --max-batch 1), one server process
with the demo model (warm-up on, so no request compiles):
- load: closed-loop clients at each concurrency (1, 4, 16, 64 by default), each sending its next request when
  the last one returns, `--requests` requests per level; every request is the demo scene with 1–6 of its masks
  (a fixed pseudo-random mix): requests/s, latency p50/p95/p99, errors, batch sizes formed, server RSS.
- faults (on the batching server): clients that disconnect right after sending (while good clients run), a
  burst of malformed requests interleaved with good ones, and SIGTERM while requests are in flight (they
  must finish, new ones get 503, the process exits 0 within its drain bound).
Every loop is bounded in count and in time; a level that runs past `--level-timeout` is reported as such.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pdlm_jax.files import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "pdlm_jax" / "assets" / "demo_scene"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


IMAGE = _b64(SCENE / "image.png")
MASKS = [_b64(p) for p in sorted(SCENE.glob("mask_*.png"))]


def body(k: int) -> dict:
    """The demo scene with k masks (k = 6 repeats one: the scene has 5)."""
    return {"image": IMAGE, "masks": [MASKS[i % len(MASKS)] for i in range(k)]}


def request(url: str, payload, timeout: float = 120) -> tuple[int, dict | None]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/v1/regions/caption", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return -1, None  # refused / reset / timed out


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


class Server:
    """One pdlm-serve process on a free loopback port."""

    def __init__(self, max_batch: int, log_dir: Path, extra: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server_max_batch_{max_batch}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "infer.serve", "--port", str(self.port), "--max-batch",
                                          str(max_batch), *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited; see {self.log}")
            try:
                if get(self.url + "/healthz")["status"] == "ok":
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server not ready after {timeout} s; see {self.log}")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def batches(self) -> dict[str, int]:
        return get(self.url + "/v1/model")["batches"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def load_level(server: Server, concurrency: int, requests: int, seed: int, timeout: float) -> dict:
    """Closed loop: `concurrency` clients share `requests` requests (bounded in count and time)."""
    rng = random.Random(seed)
    counts = [rng.randint(1, 6) for _ in range(requests)]
    before = server.batches()
    latencies, errors, lock = [], 0, threading.Lock()
    next_index = iter(range(requests))
    deadline = time.monotonic() + timeout

    def client():
        nonlocal errors
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            status, result = request(server.url, body(counts[i]))
            with lock:
                latencies.append(time.perf_counter() - start)
                if status != 200 or len(result["regions"]) != counts[i]:
                    errors += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 130)
    wall = time.perf_counter() - start
    after = server.batches()
    formed = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    return {"concurrency": concurrency, "requests": len(latencies), "timed_out": len(latencies) < requests,
            "seconds": wall, "requests_per_s": len(latencies) / wall, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95), "p99_s": percentile(latencies, 99), "errors": errors,
            "batches": dict(sorted(formed.items(), key=lambda kv: int(kv[0])))}


def fault_disconnects(server: Server, clients: int, good: int) -> dict:
    """Clients that send a whole request and hang up at once, while good clients run."""
    payload = json.dumps(body(3)).encode()
    raw = (f"POST /v1/regions/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload

    def leave():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(raw)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        gone = [pool.submit(leave) for _ in range(clients)]
        ok = list(pool.map(lambda i: request(server.url, body(1 + i % 6))[0], range(good)))
        for f in gone:
            f.result()
    time.sleep(2)  # let the abandoned requests run through the batcher
    return {"disconnected": clients, "good": good, "good_ok": sum(s == 200 for s in ok),
            "healthy_after": get(server.url + "/healthz")["status"] == "ok",
            "in_flight_after": get(server.url + "/v1/model")["in_flight"] - 1}  # minus this request


def fault_malformed(server: Server, bad: int, good: int) -> dict:
    """A burst of malformed requests interleaved with good ones: every good one succeeds, no 5xx."""
    malformed = [b"not json", b"[1, 2]", json.dumps({"image": "!!", "masks": MASKS[:1]}).encode(),
                 json.dumps(body(2) | {"gen_length": 10**6}).encode(), json.dumps(body(2) | {"colour": 1}).encode(),
                 json.dumps({"image": MASKS[0]}).encode()]
    jobs = [("bad", malformed[i % len(malformed)]) for i in range(bad)] + [("good", body(1 + i % 6)) for i in range(good)]
    random.Random(1).shuffle(jobs)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda job: (job[0], request(server.url, job[1])[0]), jobs))
    return {"bad": bad, "good": good, "good_ok": sum(s == 200 for k, s in statuses if k == "good"),
            "bad_4xx": sum(400 <= s < 500 for k, s in statuses if k == "bad"),
            "server_errors": sum(s >= 500 or s < 0 for _, s in statuses)}


def fault_sigterm(server: Server, in_flight: int, drain_bound: float) -> dict:
    """SIGTERM with requests in flight: they finish, a request sent after the signal gets 503 (or, once the
    server has gone, a refused connection), and the process exits 0 within the bound."""
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        futures = [pool.submit(request, server.url, body(1 + i % 6)) for i in range(in_flight)]
        time.sleep(0.3)  # the requests are sent
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        late = request(server.url, body(1))[0]
        done = [f.result()[0] for f in futures]
    try:
        code = server.proc.wait(drain_bound)
    except subprocess.TimeoutExpired:
        code = None
    return {"in_flight": in_flight, "in_flight_ok": sum(s == 200 for s in done), "late_status": late,
            "exit_code": code, "exit_seconds": time.monotonic() - start, "bound_s": drain_bound}


def run(args: argparse.Namespace) -> dict:
    log_dir = Path(args.json).resolve().parent
    log_dir.mkdir(parents=True, exist_ok=True)
    report = {"requests_per_level": args.requests, "concurrency": args.concurrency, "settings": {}}
    for max_batch in (args.max_batch, 1):
        server = Server(max_batch, log_dir, ["--drain-seconds", str(args.drain_seconds)] + args.server_args)
        try:
            ready = server.wait_ready(args.ready_timeout)
            rss_before = server.rss_mb()
            levels = [load_level(server, c, args.requests, seed=c, timeout=args.level_timeout)
                      for c in args.concurrency]
            entry = {"ready_seconds": ready, "rss_mb_before": rss_before, "rss_mb_after": server.rss_mb(),
                     "requests_total": sum(level["requests"] for level in levels), "levels": levels}
            if max_batch == args.max_batch:
                entry["faults"] = {"disconnect": fault_disconnects(server, 16, 16),
                                   "malformed": fault_malformed(server, 48, 48),
                                   "rss_mb_after_faults": server.rss_mb()}
                entry["faults"]["sigterm"] = fault_sigterm(server, 12, args.drain_seconds + 30)
            report["settings"][f"max_batch_{max_batch}"] = entry
        finally:
            server.stop()
    return report


def print_table(report: dict) -> None:
    print(f"{'server':<14}{'conc':>5}{'reqs':>6}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'errors':>7}  "
          "batches formed (size: count)")
    for name, entry in report["settings"].items():
        for level in entry["levels"]:
            batches = " ".join(f"{k}:{v}" for k, v in level["batches"].items())
            print(f"{name:<14}{level['concurrency']:>5}{level['requests']:>6}{level['requests_per_s']:>8.2f}"
                  f"{level['p50_s']:>8.3f}{level['p95_s']:>8.3f}{level['p99_s']:>8.3f}{level['errors']:>7}  {batches}"
                  + ("  (timed out)" if level["timed_out"] else ""))
        growth = entry["rss_mb_after"] - entry["rss_mb_before"]
        print(f"{name:<14} RSS {entry['rss_mb_before']:.0f} MB before, {entry['rss_mb_after']:.0f} MB after "
              f"{entry['requests_total']} requests: +{growth:.0f} MB, "
              f"{'within' if growth <= report['rss_bound_mb'] else 'OVER'} the bound of {report['rss_bound_mb']} MB; "
              f"ready after {entry['ready_seconds']:.1f} s")
    base, single = (report["settings"].get(f"max_batch_{b}") for b in (report["max_batch"], 1))
    if base and single:
        for a, b in zip(base["levels"], single["levels"]):
            print(f"concurrency {a['concurrency']:>3}: micro-batching gives {a['requests_per_s'] / b['requests_per_s']:.2f}x"
                  " the requests/s of --max-batch 1")
    faults = (base or {}).get("faults")
    if faults:
        d, m, t = faults["disconnect"], faults["malformed"], faults["sigterm"]
        print(f"disconnects: {d['disconnected']} clients left mid-request; {d['good_ok']}/{d['good']} good requests ok; "
              f"healthy after: {d['healthy_after']}; in flight after: {d['in_flight_after']}")
        print(f"malformed:   {m['bad_4xx']}/{m['bad']} malformed got 4xx; {m['good_ok']}/{m['good']} good ok; "
              f"5xx or dropped: {m['server_errors']}; RSS after faults {faults['rss_mb_after_faults']:.0f} MB")
        print(f"SIGTERM:     {t['in_flight_ok']}/{t['in_flight']} in-flight finished ok; a new request got "
              f"{t['late_status']}; exit code {t['exit_code']} after {t['exit_seconds']:.1f} s (bound {t['bound_s']} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.bench_serve", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=250, help="requests per concurrency level")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--max-batch", type=int, default=8, help="the micro-batching server's --max-batch")
    p.add_argument("--level-timeout", type=float, default=300, help="seconds one level may take at most")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds the warm-up may take at most")
    p.add_argument("--drain-seconds", type=float, default=60)
    p.add_argument("--rss-bound-mb", type=float, default=256,
                   help="the server's RSS may grow at most this much over the load levels (first-use buffers "
                        "of every compiled program included)")
    p.add_argument("--json", default="bench_serve.json", help="where to write the results")
    p.add_argument("server_args", nargs="*", help="extra pdlm-serve flags (after --)")
    args = p.parse_args(argv)
    report = run(args) | {"max_batch": args.max_batch, "rss_bound_mb": args.rss_bound_mb}
    write_json_atomic(args.json, report)
    print_table(report)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
