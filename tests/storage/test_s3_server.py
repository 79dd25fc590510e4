"""The whole pipeline against a real S3 endpoint on this machine: moto's S3 server on 127.0.0.1 (as s3fs's own
test suite does; nothing reaches another address), reached through s3fs with an endpoint and keys in
KDCACHE_STORAGE_OPTIONS, the way a user points kdcache at MinIO or S3.

prepare -> teacher -> kill -9 of the whole launch mid-run -> the command again, while a student
trains with --follow from s3:// -> inspect --verify -> eval; the cache equals the one written to local disk
byte for byte, and the student's weights equal those of the same run on the local cache. The re-run goes to an
existing Dask cluster (`--scheduler`) whose workers have no options or keys of their own, reading the prepared
data `prepare` uploaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import re
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import free_port
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Trainer
from stages.cli import main
from tests.storage.packed import flip_member_byte, pack_key, stored_sums

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BUCKET = "kdcache-test"
STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def s3():
    """(s3fs file system, storage options) of a moto S3 server on 127.0.0.1 with one bucket."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    mp = pytest.MonkeyPatch()
    mp.setenv("KDCACHE_STORAGE_OPTIONS", json.dumps(opts))
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir(BUCKET)
    try:
        yield fs, opts
    finally:
        mp.undo()
        server.stop()


def _commits(fs, prefix: str) -> set[str]:
    fs.invalidate_cache()
    return {p.split("/")[-2] for p in fs.glob(f"{prefix}/shards/*/_COMMIT.json")}


def _kdcache() -> list[str]:
    exe = Path(sys.executable).with_name("kdcache")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from stages.cli import main; main()"]


def _bare_cluster(tmp_path):
    """A Dask cluster (2 worker processes) started as on another machine: no storage options, no AWS keys in
    its environment, a local disk of its own. -> (process, scheduler address, its environment)."""
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KDCACHE_"))}
    bare["OMP_NUM_THREADS"] = "1"
    script = ("import time; from distributed import LocalCluster\n"
              "c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host='127.0.0.1', "
              "dashboard_address=None)\n"
              "print(c.scheduler_address, flush=True)\n"
              "time.sleep(900)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**bare, "KDCACHE_LOCAL_CACHE": str(tmp_path / "w")},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    return proc, bare


def test_s3_prepare_kill_9_rerun_on_a_cluster_follow_verify_eval(s3, tmp_path, teacher_args, llama_cache,
                                                                 prepared_dir, data_file, tokenizer_dir):
    """prepare to S3 -> teacher killed (-9, its whole process group) after its first commit, a half-upload
    planted -> the same teacher re-run on an existing cluster of 2 Dask workers whose workers have no
    storage options or keys of their own (as on other machines: the launcher's --storage-option reach them),
    while a student trains with --follow from S3 -> the cache equals the local one byte for byte, the student's
    weights equal the same run's on the local cache -> inspect --verify, eval -> a flipped byte is named. The
    secret given on the command line is in no object kdcache wrote."""
    fs, opts = s3
    cluster, bare = _bare_cluster(tmp_path)  # starts while the data is prepared and the first launch runs
    try:
        data_url = f"s3://{BUCKET}/e2e/prepared"
        res = CliRunner().invoke(main, ["prepare", "--data", str(data_file), "--tokenizer", str(tokenizer_dir),
                                        "--out", data_url, "--max-length", "64"])
        assert res.exit_code == 0, res.output
        args = list(teacher_args)
        args[args.index("--data") + 1] = data_url
        url = f"s3://{BUCKET}/e2e/cache"
        cmd = [*_kdcache(), "teacher", *args, "--out", url]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_LOCAL_CACHE": str(tmp_path / "launcher")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: the kill takes the workers too
        deadline = time.monotonic() + 240
        try:
            while not _commits(fs, f"{BUCKET}/e2e/cache"):
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "no shard committed in time"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # the machine dies
        finally:
            proc.wait()
        planned = len(json.loads(fs.cat_file(f"{BUCKET}/e2e/cache/kdcache.json"))["shards"])
        killed = _commits(fs, f"{BUCKET}/e2e/cache")
        assert 1 <= len(killed) < planned, "the kill did not land mid-run"
        # What a kill inside an upload leaves: a shard's zip without its commit record (replaced on re-run).
        fs.pipe_file(f"{BUCKET}/e2e/cache/{pack_key(planned - 1)}", b"PK\x03\x04half")

        # The same command again, on the cluster, with the options on its command line only.
        address = cluster.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        secret = "s3cr3t-" + os.urandom(4).hex()  # moto accepts any key; this one must leak nowhere
        options = ["--storage-option", f"endpoint_url={opts['endpoint_url']}", "--storage-option", "key=testing",
                   "--storage-option", f"secret={secret}"]
        rerun = subprocess.Popen([*cmd, "--scheduler", address, *options],
                                 env={**bare, "KDCACHE_LOCAL_CACHE": str(tmp_path / "launcher")},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        student = tmp_path / "student.json"
        student.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size_of(prepared_dir)}))
        # follow in both runs: its epoch 0 reads shard by shard, a plan of its own (pipeline/data/stream.py)
        common = dict(student_config=str(student), batch_tokens=120, seed=3, device="cpu", data=str(prepared_dir),
                      follow=True)
        try:
            t = Trainer(TrainConfig(out=str(tmp_path / "remote"), cache=url, follow_timeout=240,
                                    local_cache=str(tmp_path / "mirror"), prefetch_shards=2, **common))
            t.stream.poll_seconds = 0.05
            summary = t.run()
            assert summary["finished"]
        finally:
            out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err[-2000:]
        assert f"{len(killed)} already committed" in out and secret not in out + err
    finally:
        os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait()
    assert stored_sums(url) == stored_sums(llama_cache)  # byte-identical to the uninterrupted local run
    assert list((tmp_path / "w" / "prepared").glob("*/kdcache_prepare.json"))  # the workers' own copy of the data
    fs.invalidate_cache()
    for path in fs.find(f"{BUCKET}/e2e"):
        if "/c/" not in path:  # every file but the array chunks: metadata, records, config, the index, the data
            assert secret.encode() not in fs.cat_file(path), path

    local = Trainer(TrainConfig(out=str(tmp_path / "local"), cache=str(llama_cache), **common))
    local.run()
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("remote", "local"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    res = CliRunner().invoke(main, ["inspect", url, "--verify"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "remote"), "--cache", url,
                                    "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "teacher_top1_agreement" in (tmp_path / "eval" / "eval.json").read_text()

    # A flipped byte in the store: named by --verify (the shard and file), never trained on.
    rel = f"{BUCKET}/e2e/cache/{pack_key(2)}"
    fs.pipe_file(rel, flip_member_byte(fs.cat_file(rel), "head_gaps/c/0/0", 0x01))
    res = CliRunner().invoke(main, ["inspect", url, "--verify"])
    assert res.exit_code != 0 and "shard_00002: file head_gaps/c/0/0 checksum mismatch" in res.output


def vocab_size_of(prepared_dir) -> int:
    from pipeline.data.prepare import prepared_meta

    return int(prepared_meta(prepared_dir)["tokenizer"]["vocab_size"])


def test_s3_missing_bucket_is_one_line(s3, teacher_args):
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", "s3://no-such-bucket-kd/cache"])
    assert res.exit_code == 1 and not isinstance(res.exception, (AssertionError, AttributeError, TypeError))
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert "s3://no-such-bucket-kd/cache" in lines[-1] and "does not exist" in lines[-1], res.output
    assert "Traceback" not in res.output


def test_torchrun_ranks_write_one_cache_to_s3(s3, tmp_path, teacher_args, llama_cache):
    """Two torchrun ranks (gloo) of one launch take the shards round-robin and commit them straight to the S3 URL:
    one lease for the launch (not a refusal of the second rank), and the cache equals the local one's bytes."""
    fs, opts = s3
    url = f"s3://{BUCKET}/torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), *_kdcache(),
                           "teacher", *teacher_args, "--out", url], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    written = [int(n) for n in re.findall(r"teacher: (\d+) shard\(s\) written", proc.stdout)]
    assert len(written) == 2 and all(n >= 1 for n in written), proc.stdout
    assert stored_sums(url) == stored_sums(llama_cache)
    fs.invalidate_cache()
    assert not fs.glob(f"{BUCKET}/torchrun/.kdcache/lease*.json")  # the launch's lease is released when it ends
