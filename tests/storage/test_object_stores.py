"""The pipeline against Google Cloud Storage and Azure Blob endpoints on this machine, reached through the
provider's fsspec package the way a user reaches the cloud, with the endpoint given as storage options:

- gs://  gcp-storage-emulator (a GCS JSON-API server in Python, in memory, on 127.0.0.1) through gcsfs;
- az://  Azurite (Microsoft's Azure Storage emulator, Node.js, in memory, on 127.0.0.1) through adlfs. It is not
         a Python package: the test runs where `azurite-blob` is found ($KDCACHE_AZURITE, the PATH, or
         ~/.cache/kdcache/azurite after `npm install --prefix ~/.cache/kdcache/azurite azurite@3`) and with adlfs
         installed (`pip install -e '.[azure]'`), and is skipped otherwise.

prepare -> teacher -> inspect --verify -> train --out URL (stopped, then continued from a fresh copy) -> eval
--model URL --out URL: the cache equals the local one byte for byte, the student the same run's on a local
disk, and a flipped byte in the store is named. (S3: tests/storage/test_s3_server.py.) The GCS emulator does
not honour conditional writes (create-if-absent), so the lease's race is not exercised there (it is on S3,
Azurite and memory://).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import free_port
from stages.cli import main
from tests.storage.packed import flip_member_byte, pack_key, stored_sums

# gcsfs >= 2025.x asks GCS's gRPC control API what kind each bucket is (60 s timeout against an emulator, which
# serves only the JSON API): off here, as for any endpoint other than Google's.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

pytestmark = pytest.mark.usefixtures("torch_one_thread")
BUCKET = "kdcache-test"
STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}
# Azurite's well-known development account (public, in Microsoft's documentation): not a secret.
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _gcs():
    pytest.importorskip("gcsfs")
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    import logging

    import gcsfs

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    server = server_mod.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "kdcache-test"}
    return "gs", gcsfs.GCSFileSystem(**opts), opts, server.stop


def _azurite() -> str | None:
    for exe in (os.environ.get("KDCACHE_AZURITE"), shutil.which("azurite-blob"),
                str(Path.home() / ".cache/kdcache/azurite/node_modules/.bin/azurite-blob")):
        if exe and Path(exe).is_file():
            return exe
    return None


def _azure():
    pytest.importorskip("adlfs")
    exe = _azurite()
    if exe is None:
        pytest.skip("Azurite not installed (npm install --prefix ~/.cache/kdcache/azurite azurite@3)")
    import adlfs

    port = free_port()
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--silent", "--disableTelemetry", "--skipApiVersionCheck"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{AZ_ACCOUNT};")
    opts = {"connection_string": conn}
    fs = adlfs.AzureBlobFileSystem(**opts)
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir(BUCKET)
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)

    def stop():
        proc.kill()
        proc.wait()

    return "az", fs, opts, stop


@pytest.fixture(scope="module", params=["gs", "az"])
def endpoint(request):
    """(URL scheme, the provider's file system, storage options) of an emulator on 127.0.0.1 with one bucket."""
    scheme, fs, opts, stop = (_gcs if request.param == "gs" else _azure)()
    mp = pytest.MonkeyPatch()
    mp.setenv("KDCACHE_STORAGE_OPTIONS", json.dumps(opts))
    try:
        yield scheme, fs, opts
    finally:
        mp.undo()
        stop()


def test_prepare_teacher_verify_train_eval(endpoint, tmp_path, monkeypatch, teacher_args, llama_cache, data_file,
                                               tokenizer_dir, prepared_dir):
    scheme, fs, _ = endpoint
    monkeypatch.setenv("KDCACHE_LOCAL_CACHE", str(tmp_path / "copies"))
    run = CliRunner().invoke
    data = f"{scheme}://{BUCKET}/prep"
    res = run(main, ["prepare", "--data", str(data_file), "--tokenizer", str(tokenizer_dir), "--out", data,
                     "--max-length", "64"])
    assert res.exit_code == 0, res.output
    args = list(teacher_args)
    args[args.index("--data") + 1] = data
    cache = f"{scheme}://{BUCKET}/cache"
    res = run(main, ["teacher", *args, "--out", cache])
    assert res.exit_code == 0, res.output
    assert stored_sums(cache) == stored_sums(llama_cache)  # the same bytes as the cache written to a local disk
    res = run(main, ["inspect", cache, "--verify"])
    assert res.exit_code == 0, res.output

    from pipeline.data.prepare import prepared_meta

    student = tmp_path / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": int(prepared_meta(prepared_dir)["tokenizer"]["vocab_size"])}))
    common = ["--student-config", str(student), "--max-steps", "4", "--batch-size", "4", "--save-every", "2",
              "--seed", "3", "--device", "cpu"]
    out = f"{scheme}://{BUCKET}/runs/kd"
    res = run(main, ["train", "--cache", cache, "--out", out, "--stop-after", "2", *common])
    assert res.exit_code == 0, res.output
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/runs/kd/checkpoints/step_000002/_COMMIT.json")
    assert not fs.exists(f"{BUCKET}/runs/kd/final/_COMMIT.json")
    res = run(main, ["train", "--cache", cache, "--out", out, *common])  # continues from step 2 (a fresh copy)
    assert res.exit_code == 0, res.output
    res = run(main, ["train", "--cache", str(llama_cache), "--out", str(tmp_path / "local"), *common])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load, load_file

    a = load(fs.cat_file(f"{BUCKET}/runs/kd/final/model.safetensors"))
    b = load_file(tmp_path / "local" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    res = run(main, ["eval", "--model", out, "--cache", cache, "--out", f"{out}/eval", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "teacher_top1_agreement" in json.loads(fs.cat_file(f"{BUCKET}/runs/kd/eval/eval.json"))

    rel = f"{BUCKET}/cache/{pack_key(1)}"
    fs.pipe_file(rel, flip_member_byte(fs.cat_file(rel), "head_gaps/c/0/0", 0x01))
    res = run(main, ["inspect", cache, "--verify"])
    assert res.exit_code != 0 and "shard_00001: file head_gaps/c/0/0 checksum mismatch" in res.output
