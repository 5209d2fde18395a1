"""Parallel writers into one local MLflow store: SQLite (default journal), SQLite in WAL mode,
and a local `mlflow server` on 127.0.0.1. Each writer is a process that logs a job's worth of
data (params, 20 epochs x 12 metrics in batches, tags, an artifact). Prints wall time relative
to the WAL store and what was lost; `python benchmarks/bench_parallel_store.py [writers]`."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITER = r"""
import sys, time, mlflow
from mlflow.entities import Metric, Param
client = mlflow.MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("bench").experiment_id
errors = 0
run = client.create_run(exp, tags={"writer": sys.argv[2]}).info.run_id
client.log_batch(run, params=[Param(f"p{i}", str(i)) for i in range(60)])
for epoch in range(20):
    now = int(time.time() * 1000)
    try:
        client.log_batch(run, metrics=[Metric(f"m{i}", epoch + i, now, epoch) for i in range(12)])
    except Exception as err:
        errors += 1
        print("error", err, file=sys.stderr)
client.log_text(run, "x" * 10000, "note.txt")
client.set_terminated(run)
print(errors)
"""


def measure(uri: str, writers: int) -> tuple[float, int, int]:
    start = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, uri, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(writers)
    ]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    crashed = sum(p.returncode != 0 for p in procs)
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("bench").experiment_id
    runs = client.search_runs([exp])
    points = sum(len(client.get_metric_history(r.info.run_id, f"m{i}")) for r in runs for i in range(12))
    lost = writers * 20 * 12 - points + crashed
    if crashed:
        print(outs[0][1].decode()[-500:], file=sys.stderr)
    return wall, lost, len(runs)


def fresh_sqlite(folder: Path, wal: bool) -> str:
    import mlflow

    path = folder / f"{'wal' if wal else 'journal'}.db"
    uri = f"sqlite:///{path}"
    mlflow.MlflowClient(uri).create_experiment("bench", (folder / "art").as_uri())
    if wal:
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA journal_mode=WAL")
    return uri


def main() -> None:
    writers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {
            "sqlite (rollback journal)": measure(fresh_sqlite(folder, False), writers),
            "sqlite (WAL)": measure(fresh_sqlite(folder, True), writers),
        }
        backend = fresh_sqlite(folder / "srv", False) if (folder / "srv").mkdir() is None else ""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--default-artifact-root", (folder / "srv-art").as_uri()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            startup = time.perf_counter() - started
            results[f"mlflow server, 1 worker (+{startup:.1f}s startup)"] = measure(f"http://127.0.0.1:{port}", writers)
        finally:
            server.terminate()
            server.wait()
    base = results["sqlite (WAL)"][0]
    print(f"{writers} parallel writers x (60 params, 20 x 12 metrics, 1 artifact)")
    print("| store | wall / WAL | runs | lost points |\n|---|---|---|---|")
    for name, (wall, lost, runs) in results.items():
        print(f"| {name} | {wall / base:.2f} | {runs}/{writers} | {lost} |")


if __name__ == "__main__":
    main()
