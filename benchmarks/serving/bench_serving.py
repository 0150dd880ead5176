"""Serving under load: a synthetic 1M-item corpus behind ``twotower serve`` on loopback.

Run from the repository root (see README.md next to this file for recorded results):

    PYTHONPATH=src python benchmarks/serving/bench_serving.py

1. Builds (once, cached in ``--workdir``) a tiny random query tower (user and history
   embeddings, one linear layer) and a synthetic
   corpus of ``--items`` unit vectors of dim 64 clustered around query-tower outputs of
   ``--clusters`` user profiles (a trained model puts users near the items they
   engage with), Zipf log popularity folded in, indexed with ``ItemIndex.build``
   (``"auto"``: HNSW above 100k items, efSearch tuned to recall@100 >= 0.95 against
   exact search on real query-tower queries, and that recall stored with the index).
2. Starts ``twotower.serve.serve`` in a subprocess (uvicorn, 127.0.0.1).
3. The floor: the same queries' embeddings searched in process, one at a time, in a
   bare ``faiss`` loop on the same index (best of 1 and 2 OpenMP threads).
4. Open loop: requests sent on a fixed schedule (``--rate`` per second for
   ``--duration`` s), latency measured from each request's scheduled send time, so a
   stalled server cannot hide its queueing delay (no coordinated omission).
5. Closed loop: ``--concurrency`` clients, each sending its next request when the last
   one is answered, for ``--closed-duration`` s: sustained requests/s and p99.

The load generator is a minimal asyncio HTTP/1.1 keep-alive client (cheaper per request
than a full client library, so it takes less of the CPU it shares with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from twotower.checkpoint import save_model
from twotower.data.interactions import Columns
from twotower.experiment import default_model_config
from twotower.index import ItemIndex, model_fingerprint
from twotower.recommend import Recommender
from twotower.towers import TwoTowerModel

HISTORY = 20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def request_bodies(num: int, users: int, items: int, seed: int) -> list[dict]:
    """JSON requests: a user id and a history of 0..20 item ids, ``k = 100``."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, HISTORY + 1, num)
    return [{"user": int(rng.integers(users)),
             "history": rng.integers(items, size=n).tolist(), "k": 100} for n in lengths]


def embed_bodies(recommender: Recommender, bodies: list[dict]) -> np.ndarray:
    """``[len(bodies), 64]`` query-tower outputs, through the recommender's own parsing."""
    from twotower.evaluate import embed
    from twotower.features import Bag, EncodedFeatures

    columns = {"user_id": np.array([b["user"] for b in bodies]),
               "history": Bag.from_lists([b["history"] for b in bodies])}
    features = EncodedFeatures(recommender.specs, recommender.model.config.tables, columns)
    return embed(recommender.model, features, "query").numpy()


def build(workdir: Path, num_items: int, clusters: int, seed: int) -> dict:
    """The query tower, corpus and index, written under ``workdir``."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    columns = Columns()
    config = default_model_config(columns, item_buckets=1 << 16, user_buckets=1 << 14,
                                  feature_buckets=16, dim=16, hidden=(), output_dim=64)
    model = TwoTowerModel(config)
    # Spread the random tower's outputs over the sphere as a trained tower's are: with
    # default init the output bias dominates and every query points the same way.
    with torch.no_grad():
        model.tables["user"].weight.normal_(0, 1.0)
        model.tables["item"].weight.normal_(0, 0.5)
        model.query_tower.mlp[-1].bias.zero_()
    save_model(workdir / "model", model, None, {"columns": asdict(columns)})
    stub = Recommender(model, ItemIndex.build(np.zeros((1, 64), np.float32), np.zeros(1)),
                       {"columns": asdict(columns)})

    log(f"corpus: {num_items:,} items around {clusters:,} user profiles")
    centres = embed_bodies(stub, request_bodies(clusters, clusters, num_items, seed + 1))
    which = rng.integers(clusters, size=num_items)
    vectors = np.empty((num_items, 64), np.float32)
    for start in range(0, num_items, 100_000):
        part = slice(start, start + 100_000)
        noise = rng.standard_normal((len(which[part]), 64)).astype(np.float32)
        x = centres[which[part]] + 0.08 * noise
        vectors[part] = x / np.linalg.norm(x, axis=1, keepdims=True)
    log_p = (-0.8 * np.log1p(rng.permutation(num_items)) - 4.0).astype(np.float32)

    queries = embed_bodies(stub, request_bodies(1000, clusters, num_items, seed + 2))
    log("indexing (auto: HNSW above 100k items, efSearch tuned to recall@100 >= 0.95)")
    started = time.perf_counter()
    index = ItemIndex.build(vectors, np.arange(num_items), "auto", log_popularity=log_p,
                            recall_queries=queries, recall_penalties=(0.0, 0.05),
                            info={"synthetic": True,
                                  "model_fingerprint": model_fingerprint(workdir / "model")})
    seconds = time.perf_counter() - started
    index.save(workdir / "index")
    log(f"built {index.factory} in {seconds:.0f} s: {index.meta['recall']}, "
        f"{index.meta.get('search_params')}")
    return {"build_seconds": round(seconds, 1)}


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: "
                          b"application/json\r\ncontent-length: %d\r\n\r\n%s"
                          % (path.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines
                      if line.lower().startswith(b"content-length:"))
        return int(lines[0].split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def summary(latencies: list[float], errors: int, seconds: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies) + errors, "errors": errors,
            "requests_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "max_ms": round(float(ms.max()), 2) if len(ms) else None}


async def open_loop(port: int, bodies: list[bytes], rate: float, duration: float) -> dict:
    """Requests at fixed times ``i / rate``; latency counts from the scheduled time."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(64):
        pool.put_nowait(await Connection.open(port))
    latencies, errors = [], 0
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.1

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        connection = await pool.get()
        try:
            status, _ = await connection.post("/v1/recommend", bodies[i % len(bodies)])
            if status == 200:
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors += 1
            pool.put_nowait(connection)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            pool.put_nowait(await Connection.open(port))

    tasks = []
    for i in range(int(rate * duration)):
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        tasks.append(loop.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return summary(latencies, errors, duration)


async def closed_loop(port: int, bodies: list[bytes], concurrency: int,
                      duration: float) -> dict:
    """``concurrency`` clients back to back for ``duration`` seconds."""
    latencies, errors = [], 0
    stop = time.perf_counter() + duration

    async def client(c: int) -> None:
        nonlocal errors
        connection = await Connection.open(port)
        i = c
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            try:
                status, _ = await connection.post("/v1/recommend", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                connection = await Connection.open(port)
                continue
            if status == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1
            i += concurrency
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return summary(latencies, errors, time.perf_counter() - started)


def floor(index_dir: Path, queries: np.ndarray, k: int) -> dict:
    """Bare faiss search of the same queries, one at a time, on the same index."""
    import faiss

    index = ItemIndex.load(index_dir)
    full = np.hstack([queries, np.zeros((len(queries), 1), np.float32)]) \
        if index.popularity is not None else queries
    best = {}
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        for q in full[:200]:  # warm up
            index.index.search(q[None, :], k)
        started = time.perf_counter()
        for q in full:
            index.index.search(q[None, :], k)
        rate = len(full) / (time.perf_counter() - started)
        if rate > best.get("requests_per_s", 0):
            best = {"requests_per_s": round(rate, 1), "omp_threads": threads}
    return best


class CpuMeter:
    """CPU used by the server, by this process and by everything else on the machine.

    The other processes' share says how far a run was disturbed by unrelated load.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        server = 0.0
        if self.server_pid is not None:
            stat = Path(f"/proc/{self.server_pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            server = (int(fields[11]) + int(fields[12])) / tick
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        return time.perf_counter(), server, time.process_time(), busy

    def cores(self) -> dict:
        """Cores used since the meter started (or was last read)."""
        now = self._read()
        wall, server, own, busy = (b - a for a, b in zip(self.start, now, strict=True))
        self.start = now
        return {"server": round(server / wall, 2), "load_generator": round(own / wall, 2),
                "other_processes": round(max(busy - server - own, 0.0) / wall, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    code = ("from twotower.serve import Limits, serve; "
            f"serve({str(workdir / 'model')!r}, {str(workdir / 'index')!r}, port={port}, "
            f"threads={args.server_threads}, limits=Limits(max_wait_ms={args.max_wait_ms}, "
            f"max_micro_batch={args.micro_batch}))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    for _ in range(1200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                if b" 200 " in s.recv(1024):
                    return server
        except OSError:
            time.sleep(0.1)
        if server.poll() is not None:
            raise SystemExit("the server exited during startup")
    raise SystemExit("the server did not become ready")


def portable_command(argv: list[str]) -> str:
    """The command line as run, paths relative to the repository (outside it: the file
    name alone), so the recorded results name no machine's directories."""
    root = Path(__file__).resolve().parents[2]
    words = []
    for word in argv:
        path = Path(word)
        if path.is_absolute():
            path = path.resolve()
            word = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        words.append(word)
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "twotower-bench-serving")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached corpus")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--closed-duration", type=float, default=30.0)
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--max-wait-ms", type=float, default=1.0)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import uvloop

    results: dict = {"command": portable_command(sys.argv), "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine()}
    marker = args.workdir / f"built-{args.items}-{args.clusters}-{args.seed}.json"
    if args.rebuild or not marker.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(build(args.workdir, args.items, args.clusters, args.seed)))
    results["build"] = json.loads(marker.read_text())
    recommender = Recommender.load(args.workdir / "model", args.workdir / "index")
    results["index"] = {key: recommender.index.meta.get(key) for key in (
        "factory", "size", "dim", "build_params", "search_params", "recall")}
    bodies = request_bodies(20_000, args.clusters, args.items, args.seed + 3)
    encoded = [json.dumps(b).encode() for b in bodies]
    meter = CpuMeter(None)
    results["floor"] = floor(args.workdir / "index", embed_bodies(recommender, bodies[:5000]),
                             100)
    results["floor"]["other_processes_cores"] = meter.cores()["other_processes"]
    del recommender
    log(f"floor (bare faiss, one query at a time): {results['floor']}")

    port = free_port()
    server = start_server(args.workdir, port, args)
    try:
        log("warm-up: 5 s closed loop, not recorded")
        uvloop.run(closed_loop(port, encoded, args.concurrency, 5.0))
        log(f"open loop: {args.rate:.0f} requests/s for {args.duration:.0f} s")
        meter = CpuMeter(server.pid)
        results["open_loop"] = uvloop.run(open_loop(port, encoded, args.rate, args.duration))
        results["open_loop"]["cpu_cores"] = meter.cores()
        log(f"open loop: {results['open_loop']}")
        log(f"closed loop: concurrency {args.concurrency} for {args.closed_duration:.0f} s")
        results["closed_loop"] = uvloop.run(closed_loop(port, encoded, args.concurrency,
                                                        args.closed_duration))
        results["closed_loop"]["cpu_cores"] = meter.cores()
        log(f"closed loop: {results['closed_loop']}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    results["closed_loop_vs_floor"] = round(
        results["closed_loop"]["requests_per_s"] / results["floor"]["requests_per_s"], 3)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
