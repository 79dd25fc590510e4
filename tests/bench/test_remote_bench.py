"""bench/remote.py (issue #15 item 6: a cache on an object store vs local disk) in its --quick mode: a moto S3
server on 127.0.0.1, a tiny synthetic cache uploaded, streamed from local disk and through the mirror, and the
teacher's shard commit timed both ways. Checks the JSON it writes: every figure is there, the first epoch
downloads the cache's bytes once (a few percent of slack), the second downloads nothing.

    .venv/bin/python -m pytest tests/bench/test_remote_bench.py -q --runslow
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "remote.py"

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.mark.slow  # --runslow: a smoke of the benchmark script; what it measures is tested in tests/storage
def test_remote_bench_quick(tmp_path):
    out = tmp_path / "remote.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDCACHE_STORAGE_OPTIONS", None)
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| s3, second epoch (same Cache) |" in proc.stdout
    res = json.loads(out.read_text())
    for key in ("date", "settings", "cache_rows", "shards", "cache_bytes", "local_epoch0_rows_s", "local_epoch1_rows_s",
                "remote_epoch0_rows_s", "remote_epoch1_rows_s", "ratio_first_epoch", "ratio_second_epoch",
                "bytes_first_epoch", "bytes_second_epoch", "bytes_ratio_first_epoch", "upload", "goals"):
        assert key in res, key
    assert res["settings"]["quick"] and res["shards"] >= 2 and res["cache_bytes"] > 0
    for key in ("local_epoch0_rows_s", "local_epoch1_rows_s", "remote_epoch0_rows_s", "remote_epoch1_rows_s"):
        assert res[key] and all(r > 0 for r in res[key]), key
    assert res["ratio_first_epoch"] > 0 and res["ratio_second_epoch"] > 0
    assert 1.0 <= res["bytes_first_epoch"] / res["cache_bytes"] <= 1.05
    assert res["bytes_second_epoch"] == 0
    up = res["upload"]
    assert up["shards"] >= 1 and up["local_s"] and up["s3_s"] and up["ratio_s3_over_local"] > 0
