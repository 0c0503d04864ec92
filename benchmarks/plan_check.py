"""Plan-time check of a Parquet split on object storage: every file's footer and schema read one by one (before)
against ``sources.PLAN_THREADS`` at once (now), in one run, on the same 1,000 files.

    .venv/bin/python benchmarks/plan_check.py [--files 1000]

The files sit in a bucket of an S3 server (moto) started here on 127.0.0.1: every footer is a real HTTP round trip.
A loopback answers in well under a millisecond and moto (one Python process) then bounds the rate, so the same
checks also go through a proxy that holds every request ``--latency_ms`` (default 20: a cloud bucket's round trip
from a VM in its region is of that order; the figure is an assumption, not a measurement of any bucket). With
``key_prefix`` the key column of every row group is read too (a holdout count needs the keys)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delaying_proxy(target: int, latency_s: float) -> int:
    """A TCP forwarder on a free port to 127.0.0.1:``target`` that holds each chunk a client sends ``latency_s``
    (one chunk per HTTP request here): the round trip of a distant bucket, on a loopback."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(256)

    def pipe(src, dst, delay: float) -> None:
        try:
            while data := src.recv(1 << 16):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while True:
            client, _ = lsock.accept()
            upstream = socket.create_connection(("127.0.0.1", target))
            threading.Thread(target=pipe, args=(client, upstream, latency_s), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, 0.0), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return lsock.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--latency_ms", type=float, default=20.0)
    args = ap.parse_args()
    url = f"http://127.0.0.1:{_port()}"
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _run(url, args.files, args.latency_ms)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _run(url: str, n: int, latency_ms: float) -> None:
    import urllib.request

    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from igpt import hw
    from igpt.data import sources
    from igpt.data.sources import DatasetSpec

    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    fs = pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True)
    fs.create_dir("plan")
    t0 = time.perf_counter()
    for i in range(n):  # one small row group each: 4 records of a few bytes, as many round trips as a real file
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": [f"train/{i}/{j}" for j in range(4)], "image": [b"x"] * 4,
                                 "label": [j for j in range(4)]}), buf)
        with fs.open_output_stream(f"plan/train/part-{i:05d}.parquet") as fh:
            fh.write(buf.getvalue())
    print(hw.describe())
    print(f"{n} Parquet files written to s3://plan/train on {url} in {time.perf_counter() - t0:.1f} s")
    slow = f"http://127.0.0.1:{delaying_proxy(int(url.rsplit(':', 1)[1]), latency_ms / 1000)}"
    rows = []
    for endpoint, latency in ((url, "loopback"), (slow, f"+{latency_ms:g} ms a request")):
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # pyarrow's S3 file system reads it when the plan opens one
        for prefix in ("", "train/"):
            spec = DatasetSpec("s3://plan", key_prefix=prefix)
            threads_now = sources.PLAN_THREADS
            for threads in (1, threads_now):
                sources.PLAN_THREADS = threads
                t = time.perf_counter()
                plan = sources.check(spec)
                rows.append((latency, prefix or "-", threads, time.perf_counter() - t, plan.count))
            sources.PLAN_THREADS = threads_now
    print("\n| latency | key_prefix | files at once | check (s) | records |\n|---|---|---:|---:|---:|")
    for latency, prefix, threads, secs, count in rows:
        print(f"| {latency} | {prefix} | {threads} | {secs:.2f} | {count} |")
    for i in range(0, len(rows), 2):
        print(f"{rows[i][0]}, key_prefix {rows[i][1]}: {rows[i][3] / rows[i + 1][3]:.1f}x faster with "
              f"{rows[i + 1][2]} at once")


if __name__ == "__main__":
    main()
