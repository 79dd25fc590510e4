"""A cache on an object store vs on local disk (issue #15, item 6): reader rows/s, bytes fetched, upload cost.

    OMP_NUM_THREADS=1 .venv/bin/python bench/remote.py --out runs/bench-remote/result.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/remote.py --quick --out /tmp/remote.json   # tiny, < 30 s (the test's)

An S3-compatible server (moto) is started on 127.0.0.1 on a free port, in this process (`--server thread`,
the default) or in a child process (`--server process`: its request handling then holds no lock the reader
needs, though on a busy machine it still takes CPU time from it). `--store gs` runs gcp-storage-emulator and
`--store az` Azurite ($KDCACHE_AZURITE, the PATH or ~/.cache/kdcache/azurite), each in a child process. The cache is bench/reader.py's synthetic
format-3 cache (`bench.reader.build`, the same work directory, so either script reuses the other's), put
into s3://kdbench/cache as the teacher puts a cache (each shard one zip, then its _COMMIT.json; the plan's
files, then kdcache.json last).

What is timed, all in this process (compare ratios within one run: this machine is shared and noisy):
  local    `CacheStream` (pipeline.data.stream, the trainer's reader: `--threads` read threads, micro-batches
           of about `--batch-tokens` tokens) over the local cache, freshly opened: epoch 0, then epoch 1
  remote   the same over `open_cache("s3://...", local_cache=<empty directory>, prefetch=--prefetch)`: epoch 0
           downloads every shard (first epoch), epoch 1 reads the local copy (second epoch, same Cache object)
           rows/s of each epoch, timed from its first micro-batch request to its last (opening the cache and
           building the stream are outside); local and remote alternate, `--repeats` times; the ratios are
           medians of the per-repeat ratios (first epoch vs the local epoch 0, second vs the local epoch 1,
           and the first also vs the local epoch 1, the steady local speed)
  bytes    `cache.mirror.bytes_downloaded` per epoch / the cache's bytes (sum of the commit records' "bytes")
  requests one download (`Store.get_file`) of a 1 KB and of a 1 MB object, 20 times each: wall time, this
           process's CPU and the server's, per request
  upload   `pipeline.cache.writer.write_shard` of `--upload-shards` shards (their arrays read back with
           `Cache.read_raw`) to a fresh local directory vs to a fresh s3:// prefix, alternating: what the
           teacher's commit costs more on an object store (staging, listing, parallel PUTs, the commit record)

Goals (issue #15): second epoch >= 0.9x local, first epoch >= 0.5x, bytes per epoch <= 1.05x the cache.
Prints a markdown table; `--out FILE` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BUCKET = "kdbench"
KEY = SECRET = "testing"
# --quick: 4 shards of ~3k rows over a small vocabulary (builds in a few seconds; the figures are only plumbing).
QUICK = {"rows": 12_000, "vocab": 2048, "chunk_rows": 1024, "shard_rows": 3072, "repeats": 1, "upload_shards": 1}


# ---- the S3 server -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on 127.0.0.1 (a thread of this process, or a child process), with one bucket."""

    def __init__(self, mode: str = "thread"):
        self.mode, self.port = mode, _free_port()
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        if mode == "thread":
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()
        else:  # moto's own command line, in a child process
            import subprocess

            self.server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if self.server.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError("the moto server did not start") from None
                    time.sleep(0.1)
        self.options = {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": KEY, "secret": SECRET}
        self.scheme, self.name = "s3", f"moto (S3) on 127.0.0.1, {mode}, through s3fs"
        import s3fs

        try:
            self.fs = s3fs.S3FileSystem(**self.options)
            self.fs.mkdir(BUCKET)
        except BaseException:
            self.stop()
            raise

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used (None: the server is a thread of this process)."""
        if self.mode == "thread":
            return None
        return _proc_cpu_s(self.server.pid)

    def stop(self) -> None:
        if self.mode == "thread":
            self.server.stop()
        else:
            self.server.terminate()
            self.server.wait(10)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_port(port: int, proc: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the {what} did not start") from None
            time.sleep(0.1)


class ChildServer:
    """A GCS (gcp-storage-emulator) or Azure (Azurite) emulator on 127.0.0.1 in a child process, in memory, with
    one bucket: what `--store gs` and `--store az` read from (`scheme`, `options`, `name`, `cpu_s`, `stop`)."""

    def __init__(self, store: str):
        import subprocess

        self.mode, self.port, self.scheme = "process", _free_port(), store
        if store == "gs":
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC bucket probe (60 s)
            code = ("import time; from gcp_storage_emulator.server import create_server; "
                    f"s = create_server('127.0.0.1', {self.port}, in_memory=True, default_bucket='{BUCKET}'); "
                    "s.start(); time.sleep(10**6)")
            self.server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            _wait_port(self.port, self.server, "GCS emulator")
            self.options = {"endpoint_url": f"http://127.0.0.1:{self.port}", "token": "anon", "project": "bench"}
            self.name = "gcp-storage-emulator (GCS JSON API) on 127.0.0.1, process, through gcsfs"
        else:
            exe = os.environ.get("KDCACHE_AZURITE") or shutil.which("azurite-blob") or str(
                Path.home() / ".cache/kdcache/azurite/node_modules/.bin/azurite-blob")
            self.server = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                                            "--inMemoryPersistence", "--silent", "--disableTelemetry",
                                            "--skipApiVersionCheck"], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            _wait_port(self.port, self.server, "Azurite server")
            acct, key = "devstoreaccount1", ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
                                             "K1SZFPTOtr/KBHBeksoGMGw==")  # Azurite's public development key
            self.options = {"connection_string": f"DefaultEndpointsProtocol=http;AccountName={acct};AccountKey={key};"
                                                 f"BlobEndpoint=http://127.0.0.1:{self.port}/{acct};"}
            self.name = "Azurite (Azure Blob) on 127.0.0.1, process, through adlfs"
        from fsspec.core import url_to_fs

        try:
            if store == "az":  # the GCS emulator made its default bucket
                url_to_fs(f"{store}://{BUCKET}", **self.options)[0].mkdir(BUCKET)
        except BaseException:
            self.stop()
            raise

    def cpu_s(self) -> float | None:
        return _proc_cpu_s(self.server.pid)

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(10)


def upload_cache(local: Path, url: str) -> tuple[int, float]:
    """Put the cache directory `local` at `url` as `kdcache teacher --out URL` leaves it: each shard as one
    zip, then its commit record (`remote.commit_shard`); then the plan, kdcache.json last. -> (bytes, seconds)."""
    from pipeline.cache import layout, remote
    from pipeline.storage import store_for

    store = store_for(url)
    t0 = time.perf_counter()
    for i in sorted(layout.committed_shards(local)):
        remote.commit_shard(store, i, layout.shard_dir(local, i), layout.read_commit(local, i))
    remote.upload_plan(store, local)
    return sum(store.sizes().values()), time.perf_counter() - t0


# ---- what is timed -------------------------------------------------------------------------------
def stream_epochs(data: Any, cache: Any, args: argparse.Namespace, server: Any = None
                  ) -> list[dict[str, float]]:
    """Epochs 0 and 1 of one `CacheStream` over `cache`: [{rows_s, rows, seconds, cpu_s, bytes, requests,
    server_cpu_s}] (cpu_s: this process, every thread; bytes, requests: what the mirror downloaded and the
    store calls made during the epoch, 0 for a local cache; server_cpu_s: a child-process server's CPU)."""
    from pipeline.data.stream import CacheStream

    s = CacheStream(data, cache, args.batch_size, seed=0, threads=args.threads, batch_tokens=args.batch_tokens)
    mirror = cache.mirror
    it = iter(s)
    out = []
    for epoch in (0, 1):
        n = s.batches_in_epoch(epoch)
        before = (mirror.bytes_downloaded, mirror.store.calls) if mirror is not None else (0, 0)
        srv0 = server.cpu_s() if server is not None else None
        rows = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            rows += next(it).num_targets
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = (mirror.bytes_downloaded, mirror.store.calls) if mirror is not None else (0, 0)
        srv = server.cpu_s() - srv0 if srv0 is not None else None
        out.append({"rows_s": rows / dt, "rows": rows, "seconds": dt, "cpu_s": cpu, "bytes": after[0] - before[0],
                    "requests": after[1] - before[1], "server_cpu_s": srv})
    it.close()
    return out


def time_upload(cache: Any, url: str, scratch: Path, shards: list[int], repeats: int) -> dict[str, Any]:
    """`write_shard` of `shards` (arrays read back from `cache`) to local directories vs s3:// prefixes."""
    from pipeline.cache import layout, remote
    from pipeline.cache.writer import write_shard
    from pipeline.storage import store_for

    derived = ("format_version", "rows", "files", "bytes", "array_bytes")
    jobs = []
    for i in shards:
        rec = layout.read_commit(cache.path, i)
        s = cache.shards[i]
        jobs.append((i, cache.read_raw(s["row_start"], s["row_stop"]),
                     {k: v for k, v in rec.items() if k not in derived}, rec))
    local_s: list[float] = []
    remote_s: list[float] = []
    commit_s: list[float] = []
    nbytes = 0
    for r in range(repeats):
        for i, arrays, info, rec in jobs:
            for where in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                dst = str(scratch / f"upload-{r}") if where == "local" else f"{url}-upload-{r}"
                t0 = time.perf_counter()
                new = write_shard(dst, i, arrays, info, cache.params, cache.chunk_rows)
                (local_s if where == "local" else remote_s).append(time.perf_counter() - t0)
                if new["files"] != rec["files"]:  # the same bytes as the cache's shard, file by file
                    raise AssertionError(f"shard {i} written to {where} differs from the cache's")
            # the upload step alone: the locally committed shard's files PUT, then its commit record
            store = store_for(f"{url}-commit-{r}")
            t0 = time.perf_counter()
            remote.commit_shard(store, i, layout.shard_dir(scratch / f"upload-{r}", i), rec)
            commit_s.append(time.perf_counter() - t0)
            nbytes += rec["bytes"] if r == 0 else 0
        shutil.rmtree(scratch / f"upload-{r}", ignore_errors=True)
    n = len(jobs)
    per_local = [sum(local_s[k * n:(k + 1) * n]) for k in range(repeats)]
    per_remote = [sum(remote_s[k * n:(k + 1) * n]) for k in range(repeats)]
    per_commit = [sum(commit_s[k * n:(k + 1) * n]) for k in range(repeats)]
    ratios = [b / a for a, b in zip(per_local, per_remote)]
    return {"shards": n, "bytes": nbytes, "local_s": per_local, "s3_s": per_remote, "s3_upload_only_s": per_commit,
            "ratio_s3_over_local": statistics.median(ratios),
            "extra_s_per_shard": statistics.median([(b - a) / n for a, b in zip(per_local, per_remote)]),
            "upload_only_mb_s": nbytes / 1e6 / statistics.median(per_commit)}


def time_requests(url: str, server: Any, n: int = 20) -> dict[str, dict[str, float]]:
    """One request's cost, by object size: {"1KB"|"1MB": {wall_ms, client_cpu_ms, server_cpu_ms}} (medians are not
    needed: each figure is the mean of `n` downloads of one object, after one untimed)."""
    from pipeline.storage import store_for

    store = store_for(url)
    scratch = Path(tempfile.mkdtemp(prefix="kdcache-bench-requests."))
    out = {}
    try:
        for label, size in (("1KB", 1000), ("1MB", 1_000_000)):
            store.write_bytes(f"object-{label}", os.urandom(size))
            store.get_file(f"object-{label}", scratch / label)
            srv0, c0, t0 = server.cpu_s(), time.process_time(), time.perf_counter()
            for _ in range(n):
                store.get_file(f"object-{label}", scratch / label)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            srv = server.cpu_s() - srv0 if srv0 is not None else None
            out[label] = {"wall_ms": wall / n * 1e3, "client_cpu_ms": cpu / n * 1e3,
                          "server_cpu_ms": srv / n * 1e3 if srv is not None else None}
        store.delete([f"object-{label}" for label in ("1KB", "1MB")])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


# ---- the run --------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    import reader as bench_reader  # bench/reader.py: the synthetic cache's settings, shared with it

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_reader.add_cache_args(ap)
    ap.add_argument("--threads", type=int, default=2, help="read threads of the stream (the trainer's default, 2)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--prefetch", type=int, default=2, help="shards the mirror downloads ahead")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--upload-shards", type=int, default=3)
    ap.add_argument("--server", choices=("thread", "process"), default="thread", help="--store s3: moto where")
    ap.add_argument("--store", choices=("s3", "gs", "az"), default="s3",
                    help="s3: moto; gs: gcp-storage-emulator; az: Azurite (both in a child process)")
    ap.add_argument("--workdir", default=None, help="where the synthetic cache is built (default: bench/reader.py's)")
    ap.add_argument("--quick", action="store_true", help="a tiny cache, one repeat, no warm-up (the test's; < 30 s)")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if ap.get_default(k) == getattr(args, k):
                setattr(args, k, v)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import reader as bench_reader  # bench/reader.py

    from pipeline.cache import open_cache
    from pipeline.data.prepare import load_prepared
    from pipeline.storage import configure
    from pipeline.storage.urls import ENV_OPTIONS

    work = bench_reader.work_dir(args)  # bench/reader.py's
    built_s = 0.0
    if not (work / "cache" / "kdcache.json").is_file():
        t0 = time.perf_counter()
        bench_reader.build(work, args.rows, args.top_k, args.vocab, args.chunk_rows, args.shard_rows)
        built_s = time.perf_counter() - t0
        print(f"built {work} in {built_s:.0f} s", file=sys.stderr)
    cache_dir, data = work / "cache", load_prepared(work / "prepared")
    local = open_cache(cache_dir, data=data)
    cache_bytes = sum(int(r["bytes"]) for r in local.commit_records().values())

    scratch = Path(tempfile.mkdtemp(prefix="kdcache-bench-remote."))
    env_before = {k: os.environ.get(k) for k in (ENV_OPTIONS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION")}
    server = S3Server(args.server) if args.store == "s3" else ChildServer(args.store)
    try:
        configure(server.options)
        url = f"{server.scheme}://{BUCKET}/cache"
        up_bytes, up_s = upload_cache(cache_dir, url)
        print(f"uploaded {up_bytes / 1e6:.1f} MB to {url} in {up_s:.1f} s", file=sys.stderr)

        if not args.quick:  # untimed warm-up of both paths (first calls of the stream, botocore, moto)
            stream_epochs(data, open_cache(cache_dir, data=data), args)
            c = open_cache(url, data=data, local_cache=scratch / "mirror-warmup", prefetch=args.prefetch)
            stream_epochs(data, c, args)
            c.mirror.close()
            shutil.rmtree(scratch / "mirror-warmup", ignore_errors=True)

        runs: list[dict[str, Any]] = []
        for r in range(args.repeats):
            order = ("local", "remote") if r % 2 == 0 else ("remote", "local")
            got: dict[str, Any] = {}
            for where in order:
                if where == "local":
                    got["local"] = stream_epochs(data, open_cache(cache_dir, data=data), args)
                else:
                    mirror_dir = scratch / f"mirror-{r}"  # empty: the first epoch downloads everything
                    t0 = time.perf_counter()
                    c = open_cache(url, data=data, local_cache=mirror_dir, prefetch=args.prefetch)
                    open_s = time.perf_counter() - t0
                    try:
                        got["remote"] = stream_epochs(data, c, args, server)
                    finally:
                        c.mirror.close()
                    got["remote_open_s"] = open_s
                    shutil.rmtree(mirror_dir, ignore_errors=True)
            runs.append(got)
            lo, re_ = got["local"], got["remote"]
            print(f"repeat {r}: local {lo[0]['rows_s']:,.0f} / {lo[1]['rows_s']:,.0f} rows/s, "
                  f"{server.scheme} {re_[0]['rows_s']:,.0f} / {re_[1]['rows_s']:,.0f} rows/s (epoch 0 / 1)", file=sys.stderr)

        requests = time_requests(f"{server.scheme}://{BUCKET}/requests", server)
        shards = list(range(min(args.upload_shards, len(local.shards))))
        upload = time_upload(local, url, scratch, shards, min(3, args.repeats))
    finally:
        configure(None)
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        for k, v in env_before.items():  # leave the environment as found (main() may be called in a test)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    med = statistics.median
    first = [g["remote"][0]["rows_s"] / g["local"][0]["rows_s"] for g in runs]
    second = [g["remote"][1]["rows_s"] / g["local"][1]["rows_s"] for g in runs]
    first_steady = [g["remote"][0]["rows_s"] / g["local"][1]["rows_s"] for g in runs]
    b1 = [g["remote"][0]["bytes"] for g in runs]
    b2 = [g["remote"][1]["bytes"] for g in runs]
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
        "server": server.name, "scheme": server.scheme,
        "settings": {k: getattr(args, k) for k in ("rows", "top_k", "vocab", "chunk_rows", "shard_rows", "threads",
                                                    "batch_tokens", "prefetch", "repeats", "quick")},
        "cache": str(cache_dir), "cache_rows": local.num_rows, "shards": len(local.shards), "cache_bytes": cache_bytes,
        "built_s": built_s, "upload_copy_s": up_s, "upload_copy_bytes": up_bytes,
        "local_epoch0_rows_s": [g["local"][0]["rows_s"] for g in runs],
        "local_epoch1_rows_s": [g["local"][1]["rows_s"] for g in runs],
        "remote_epoch0_rows_s": [g["remote"][0]["rows_s"] for g in runs],
        "remote_epoch1_rows_s": [g["remote"][1]["rows_s"] for g in runs],
        "remote_open_s": [g["remote_open_s"] for g in runs],
        "epochs": runs,  # every epoch's figures (rows/s, seconds, CPU seconds, bytes, requests)
        "ratio_first_epoch": med(first), "ratio_first_epoch_vs_local_epoch1": med(first_steady),
        "ratio_second_epoch": med(second),
        "ratios_first_epoch": first, "ratios_second_epoch": second,
        "bytes_first_epoch": max(b1), "bytes_second_epoch": max(b2),
        "bytes_first_epoch_per_repeat": b1, "bytes_second_epoch_per_repeat": b2,
        "bytes_ratio_first_epoch": max(b1) / cache_bytes, "bytes_ratio_second_epoch": max(b2) / cache_bytes,
        "upload": upload, "request_cost": requests,
    }
    res["goals"] = {"second_epoch_ge_0.9x": res["ratio_second_epoch"] >= 0.9,
                    "first_epoch_ge_0.5x": res["ratio_first_epoch"] >= 0.5,
                    "bytes_per_epoch_le_1.05x": res["bytes_ratio_first_epoch"] <= 1.05}
    return res


def table(res: dict[str, Any]) -> str:
    """The figures as text: a header line and two markdown tables (rows/s; bytes, upload, requests, CPU)."""
    med = statistics.median
    s, up, ep = res["settings"], res["upload"], res["epochs"]
    head = (f"{res['date']}, {res['machine']}; {res['server']}; cache: {res['cache_rows']:,} rows, K = {s['top_k']}, "
            f"V = {s['vocab']:,}, {res['shards']} shards, {res['cache_bytes'] / 1e6:.2f} MB; stream: {s['threads']} "
            f"thread(s), ~{s['batch_tokens']} tokens per micro-batch; prefetch {s['prefetch']}; "
            f"medians of {len(ep)} (ratios: medians of the per-repeat ratios)")
    first = (f"{res['ratio_first_epoch']:.2f}x ({res['ratio_first_epoch_vs_local_epoch1']:.2f}x of local epoch 1)")
    sch = res["scheme"]
    shard_mb = up["bytes"] / up["shards"] / 1e6
    rows = [
        ("local disk, epoch 0 (fresh Cache)", f"{med(res['local_epoch0_rows_s']):,.0f}", "1.00x", ""),
        ("local disk, epoch 1", f"{med(res['local_epoch1_rows_s']):,.0f}", "1.00x", ""),
        (f"{res.get('scheme', 's3')}, first epoch (empty local cache)", f"{med(res['remote_epoch0_rows_s']):,.0f}", first, ">= 0.5x"),
        (f"{res.get('scheme', 's3')}, second epoch (same Cache)", f"{med(res['remote_epoch1_rows_s']):,.0f}",
         f"{res['ratio_second_epoch']:.2f}x", ">= 0.9x"),
    ]
    other = [
        ("bytes downloaded, first epoch / cache bytes",
         f"{res['bytes_ratio_first_epoch']:.4f} ({res['bytes_first_epoch']:,} / {res['cache_bytes']:,})", "<= 1.05"),
        ("bytes downloaded, second epoch / cache bytes", f"{res['bytes_ratio_second_epoch']:.4f}", "0"),
        (f"write_shard x {up['shards']}, local dir (s, median)", f"{med(up['local_s']):.3f}", ""),
        (f"write_shard x {up['shards']}, {sch} (s, median)", f"{med(up['s3_s']):.3f}", ""),
        (f"teacher commit overhead: {sch} / local",
         f"{up['ratio_s3_over_local']:.2f}x ({up['extra_s_per_shard'] * 1e3:+.0f} ms per {shard_mb:.2f} MB shard)", ""),
        (f"upload step alone, `remote.commit_shard` x {up['shards']} (s, median)",
         f"{med(up['s3_upload_only_s']):.3f} ({up['upload_only_mb_s']:.1f} MB/s)", ""),
        *((f"one request for a {size} object: wall / client CPU / server CPU (ms)",
           f"{c['wall_ms']:.1f} / {c['client_cpu_ms']:.1f} / "
           + (f"{c['server_cpu_ms']:.1f}" if c['server_cpu_ms'] is not None else "-"), "")
          for size, c in res["request_cost"].items()),
        ("store requests, first epoch (median)",
         f"{med(e['remote'][0]['requests'] for e in ep):.0f} ({res['shards']} shards)", ""),
        (f"CPU s of this process, local epoch 0 / {sch} first epoch (median)",
         f"{med(e['local'][0]['cpu_s'] for e in ep):.2f} / {med(e['remote'][0]['cpu_s'] for e in ep):.2f}", ""),
    ]
    srv = [e["remote"][0]["server_cpu_s"] for e in ep if e["remote"][0]["server_cpu_s"] is not None]
    if srv:
        other.append(("CPU s of the server process, first epoch (median)", f"{med(srv):.2f}", ""))
    lines = [head, "", "| what | rows/s | vs local | goal |", "|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "| what | value | goal |", "|---|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in other]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    res = run(args)
    print(table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
