"""Prepared data at a URL: `prepare --out URL` uploads it (record last), and `teacher`, `train` and `eval` read
`--data URL` through a checked local copy; what the URL holds that prepare did not write is refused."""

from __future__ import annotations

import json

import fsspec
import pytest
from click.testing import CliRunner

from conftest import one_line_error
from pipeline.cache import layout
from pipeline.data.prepare import load_prepared, prepared_meta
from pipeline.errors import CorruptionError
from pipeline.storage import store_for
from stages.cli import main


@pytest.fixture
def mem(request, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_LOCAL_CACHE", str(tmp_path / "local"))  # this test's own local copies
    url = f"memory://kddata/{request.node.name}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/kddata/{request.node.name}"):
        fs.rm(f"/kddata/{request.node.name}", recursive=True)


def _prepare(data_file, tokenizer_dir, out, *extra):
    return CliRunner().invoke(main, ["prepare", "--data", str(data_file), "--tokenizer", str(tokenizer_dir),
                                     "--out", out, "--max-length", "64", *extra])


def test_prepare_to_a_url_then_teacher_and_train_read_it(mem, data_file, tokenizer_dir, prepared_dir, teacher_args,
                                                         llama_cache, tmp_path, torch_one_thread):
    data_url = f"{mem}/prepared"
    res = _prepare(data_file, tokenizer_dir, data_url)
    assert res.exit_code == 0, res.output
    store = store_for(data_url)
    assert "kdcache_prepare.json" in store.sizes() and ".kdcache/manifest.json" in store.sizes()
    assert not any("lock" in rel for rel in store.sizes())
    # the same data as prepared locally, token for token
    assert prepared_meta(data_url)["fingerprint"] == prepared_meta(prepared_dir)["fingerprint"]
    assert load_prepared(data_url)["input_ids"] == load_prepared(prepared_dir)["input_ids"]
    assert _prepare(data_file, tokenizer_dir, data_url).exit_code == 0  # the same again: nothing to do
    res = _prepare(data_file, tokenizer_dir, data_url, "--max-length", "32")
    assert res.exit_code == 1 and "pass --overwrite" in one_line_error(res)

    args = list(teacher_args)
    args[args.index("--data") + 1] = data_url
    cache = f"{mem}/cache"
    res = CliRunner().invoke(main, ["teacher", *args, "--out", cache])
    assert res.exit_code == 0, res.output
    assert {i: layout.read_commit(cache, i)["files"] for i in layout.committed_shards(cache)} == {
        i: layout.read_commit(llama_cache, i)["files"] for i in layout.committed_shards(llama_cache)}
    assert json.loads(store_for(cache).read_bytes("kdcache.json"))["data"]["path"] == data_url

    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                   "max_position_embeddings": 128, "vocab_size": prepared_meta(prepared_dir)[
                                       "tokenizer"]["vocab_size"]}))
    # no --data: the cache records the URL it was made from
    res = CliRunner().invoke(main, ["train", "--cache", cache, "--student-config", str(student), "--out",
                                    str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
                                    "--local-cache", str(tmp_path / "mirror")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run"), "--data", data_url, "--out",
                                    str(tmp_path / "eval"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    # the same evaluation written to a URL: the same figures, config.yaml naming the URL, eval.json last; a prefix holding anything else refuses in one line before any work
    evals = f"{mem}/evals/run"
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run"), "--data", data_url, "--cache", cache,
                                    "--out", evals, "--device", "cpu"])
    assert res.exit_code == 0 and f"-> {evals}/eval.json" in res.output, res.output
    got = json.loads(store_for(evals).read_bytes("eval.json"))
    local = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert got["ce"] == local["ce"] and "teacher_top1_agreement" in got
    assert sorted(store_for(evals).sizes()) == ["config.yaml", "eval.json"]
    assert f"out: {evals}" in store_for(evals).read_bytes("config.yaml").decode()
    store_for(f"{mem}/evals/other").write_bytes("notes.txt", b"mine")
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run"), "--data", data_url,
                                    "--out", f"{mem}/evals/other", "--device", "cpu"])
    assert "notes.txt is not a file `kdcache eval` writes" in one_line_error(res)
    assert sorted(store_for(f"{mem}/evals/other").sizes()) == ["notes.txt"]
    # export and inspect read both from the store (the data from the URL the cache records)
    res = CliRunner().invoke(main, ["export", cache, "--format", "distillkit", "--out", str(tmp_path / "dk")])
    assert res.exit_code == 0, res.output
    import datasets

    assert len(datasets.load_from_disk(str(tmp_path / "dk"))) == prepared_meta(prepared_dir)["examples"]
    res = CliRunner().invoke(main, ["inspect", cache])
    assert res.exit_code == 0 and data_url in res.output, res.output


def test_prepare_refuses_a_url_holding_other_files_and_replaces_its_own(mem, data_file, tokenizer_dir):
    data_url = f"{mem}/prepared"
    store = store_for(data_url)
    store.write_bytes("notes.txt", b"mine")
    res = _prepare(data_file, tokenizer_dir, data_url)
    assert res.exit_code == 1 and "notes.txt is not a file `kdcache prepare` writes" in one_line_error(res)
    assert sorted(store.sizes()) == ["notes.txt"]
    store.delete(["notes.txt"])
    assert _prepare(data_file, tokenizer_dir, data_url).exit_code == 0
    before = prepared_meta(data_url)["examples"]
    res = _prepare(data_file, tokenizer_dir, data_url, "--max-examples", "5", "--overwrite")
    assert res.exit_code == 0, res.output
    assert prepared_meta(data_url)["examples"] == 5 != before  # a new copy for the new upload


def test_an_unfinished_upload_is_not_read_and_a_damaged_file_is_named(mem, data_file, tokenizer_dir):
    data_url = f"{mem}/prepared"
    assert _prepare(data_file, tokenizer_dir, data_url).exit_code == 0
    store = store_for(data_url)
    arrow = next(rel for rel in store.sizes() if rel.endswith(".arrow"))
    raw = bytearray(store.read_bytes(arrow))
    raw[len(raw) // 2] ^= 0x01
    store.write_bytes(arrow, bytes(raw))
    with pytest.raises(CorruptionError, match=f"{arrow}: checksum mismatch on arrival"):
        prepared_meta(data_url)
    store.delete(["kdcache_prepare.json"])  # a kill before the record: not prepared data yet
    res = CliRunner().invoke(main, ["eval", "--model", "x", "--data", data_url, "--out", "/tmp/unused-kd-eval"])
    assert res.exit_code == 1 and "prepared data not found" in one_line_error(res)
