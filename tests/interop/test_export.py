"""`kdcache export`: each format read back with `datasets.load_from_disk` holds the cache's rows (ids equal,
log-probs equal in float32) on the positions its consumer reads them from, checked against `Cache.read`,
the prepared data, and the teacher model itself.

    .venv/bin/python -m pytest tests/interop/test_export.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.interop.export_layouts import DISTILLKIT, columns_of
from pipeline.data.prepare import load_prepared
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAD = -1e9


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def exports(tmp_path_factory, llama_cache) -> dict[str, Path]:
    """Every format of the ~11-shard reference cache, in batches of 7 examples (batches cross shards)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in ("hf-datasets", "axolotl", "distillkit"):
        res = invoke("export", llama_cache, "--format", fmt, "--out", root / fmt, "--batch-examples", 7)
        assert res.exit_code == 0, res.output
        assert f"as {fmt}" in res.output
        out[fmt] = root / fmt
    return out


@pytest.fixture(scope="module")
def reference(llama_cache, prepared_dir) -> dict:
    cache = open_cache(llama_cache)
    rows = cache.read(0, cache.num_rows, ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprobs"))
    raw = load_prepared(prepared_dir)
    return {"cache": cache, "rows": rows, "ids": raw["input_ids"], "mask": raw["loss_mask"],
            "start": cache.index.column("row_start").to_pylist(), "count": cache.index.column("row_count").to_pylist()}


def load(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


def targets_of(mask) -> list[int]:
    return [t for t in range(1, len(mask)) if mask[t]]


def rows_of(ref: dict, e: int) -> dict[str, np.ndarray]:
    a = ref["start"][e]
    return {k: v[a: a + ref["count"][e]] for k, v in ref["rows"].items()}


def test_hf_datasets_export_holds_the_cache_rows_per_target(exports, reference):
    ds = load(exports["hf-datasets"])
    assert len(ds) == len(reference["ids"])
    assert {c: str(f.feature.dtype if hasattr(f.feature, "dtype") else f.feature.feature.dtype)
            for c, f in ds.features.items()} == {
        "input_ids": "int32", "loss_mask": "int8", "labels": "int64", "target_positions": "int32",
        "topk_ids": "int32", "topk_logprobs": "float32", "tail_logprob": "float32", "target_logprobs": "float32"}
    ds = ds.with_format("numpy")
    for e in range(len(ds)):
        row, ids, mask = ds[e], reference["ids"][e], reference["mask"][e]
        pos = targets_of(mask)
        assert row["input_ids"].tolist() == ids and row["loss_mask"].tolist() == mask
        assert row["target_positions"].tolist() == pos
        assert row["labels"].tolist() == [ids[t] if t in pos else -100 for t in range(len(ids))]
        want = rows_of(reference, e)
        if not pos:
            assert len(row["topk_ids"]) == 0
            continue
        np.testing.assert_array_equal(row["topk_ids"], want["topk_ids"])
        for k in ("topk_logprobs", "tail_logprob", "target_logprobs"):
            np.testing.assert_array_equal(row[k].astype(np.float32), want[k], err_msg=k)  # float32, bit-exact
    meta = json.loads((exports["hf-datasets"] / "kdcache_export.json").read_text())
    assert meta["target_rows"] == reference["cache"].num_rows and meta["top_k"] == reference["cache"].k


def test_axolotl_export_puts_row_j_on_token_j_plus_1(exports, reference):
    ds = load(exports["axolotl"])
    types = {c: (f.feature.feature if hasattr(f.feature, "feature") else f.feature).dtype
             for c, f in ds.features.items()}
    assert types == {"input_ids": "int64", "attention_mask": "int64", "labels": "int64", "target_token_ids": "int64",
                     "target_logprobs": "float32", "target_mask": "int64"}
    k = reference["cache"].k
    ds = ds.with_format("numpy")
    for e in range(len(ds)):
        row, ids, mask = ds[e], reference["ids"][e], reference["mask"][e]
        L, pos = len(ids), targets_of(mask)
        assert row["input_ids"].tolist() == ids and row["attention_mask"].tolist() == [1] * L
        labels = row["labels"].tolist()
        assert labels == [ids[t] if t in pos else -100 for t in range(L)]
        tid, tlp, tm = (np.stack(row[c]) for c in ("target_token_ids", "target_logprobs", "target_mask"))
        assert tid.shape == tlp.shape == tm.shape == (L, k)
        want = rows_of(reference, e)
        for j in range(L):
            # axolotl's contract: row j describes input_ids[j + 1], masked by labels[j + 1]
            if j + 1 < L and labels[j + 1] != -100:
                i = pos.index(j + 1)
                assert tm[j].tolist() == [1] * k
                np.testing.assert_array_equal(tid[j], want["topk_ids"][i])
                np.testing.assert_array_equal(tlp[j].astype(np.float32), want["topk_logprobs"][i])
            else:
                assert tm[j].tolist() == [0] * k and tid[j].tolist() == [0] * k and (tlp[j] == PAD).all()


def test_distillkit_export_is_the_capture_layout_and_never_trains_a_padding_row(exports, reference):
    ds = load(exports["distillkit"])
    types = {c: (f.feature.feature if hasattr(f.feature, "feature") else f.feature).dtype
             for c, f in ds.features.items()}
    assert types == {"input_ids": "uint64", "labels": "int64", "token_ids": "int64", "top_values": "float32"}
    ds = ds.with_format("numpy")
    for e in range(len(ds)):
        row, ids, mask = ds[e], reference["ids"][e], reference["mask"][e]
        L, pos = len(ids), targets_of(mask)
        assert row["input_ids"].tolist() == ids
        tid = np.stack(row["token_ids"]) if L > 1 else np.zeros((0, 0))
        tv = np.stack(row["top_values"]) if L > 1 else np.zeros((0, 0))
        assert len(tid) == len(tv) == L - 1
        want = rows_of(reference, e)
        for i, t in enumerate(pos):
            np.testing.assert_array_equal(tid[t - 1], want["topk_ids"][i])
            np.testing.assert_array_equal(tv[t - 1].astype(np.float32), want["topk_logprobs"][i])
        labels = row["labels"].tolist()
        # DistillKit's KD mask is labels[j] >= 0 on row j: every such row holds teacher data ...
        assert all(j + 1 in pos for j in range(L - 1) if labels[j] != -100)
        # ... and its cross-entropy (the model's, labels shifted) keeps every target of these one-span examples
        assert [t for t in range(L) if labels[t] != -100] == pos


def test_distillkit_drops_the_labels_of_inner_span_ends():
    """Two trained spans (a chat): the last token of the first span has no teacher row after it."""
    ids = np.arange(10, 20)
    mask = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], dtype=np.int8)
    rows = {"topk_ids": np.arange(5 * 2).reshape(5, 2) + 100, "topk_logprobs": -np.ones((5, 2), np.float32)}
    cols, stats = columns_of(DISTILLKIT, [(ids, mask, rows)])
    labels = cols["labels"].to_pylist()[0]
    assert labels == [-100, -100, -100, 13, -100, -100, -100, 17, 18, 19]  # 14's successor 15 is untrained
    token_ids = cols["token_ids"].to_pylist()[0]
    assert [r[0] for r in token_ids] == [0, 0, 100, 102, 0, 0, 104, 106, 108]  # row j: target j + 1
    assert stats == {"padded_rows": 4, "dropped_labels": 1}


def test_every_format_agrees_with_the_teacher_model(exports, reference, llama_dir):
    """Independent truth for the alignment: the teacher's own log-softmax at position j is the exported row
    that each format says describes input_ids[j + 1] (within the cache's head quantisation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tol = reference["cache"].params.head_step  # the head codec's step: its error is at most half of it
    own, axo, dk = (load(exports[f]).with_format("numpy") for f in ("hf-datasets", "axolotl", "distillkit"))
    checked = 0
    for e in range(0, len(own), 9):
        ids = reference["ids"][e]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
        o = own[e]
        for i, t in enumerate(o["target_positions"].tolist()):
            j = t - 1  # the position whose output predicts token t
            for got_ids, got_lp in ((o["topk_ids"][i], o["topk_logprobs"][i]),
                                    (axo[e]["target_token_ids"][j], axo[e]["target_logprobs"][j]),
                                    (dk[e]["token_ids"][j], dk[e]["top_values"][j])):
                got_ids = np.asarray(got_ids)
                assert got_ids[0] == np.argmax(logp[j])
                np.testing.assert_allclose(np.asarray(got_lp), logp[j][got_ids], atol=tol)
            checked += 1
    assert checked > 20


def test_rerun_refuses_then_overwrites_only_its_own_files(tmp_path, llama_cache):
    out = tmp_path / "exp"
    assert invoke("export", llama_cache, "--format", "axolotl", "--out", out).exit_code == 0
    res = invoke("export", llama_cache, "--format", "distillkit", "--out", out)
    assert res.exit_code == 1 and "--overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    (out / "notes.txt").write_text("mine")
    res = invoke("export", llama_cache, "--format", "distillkit", "--out", out, "--overwrite")
    assert res.exit_code == 1 and "notes.txt" in res.output and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "kdcache_export.json").read_text())["format"] == "axolotl"  # nothing was replaced
    (out / "notes.txt").unlink()
    res = invoke("export", llama_cache, "--format", "distillkit", "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "kdcache_export.json").read_text())["format"] == "distillkit"
    assert "token_ids" in load(out).column_names
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_bad_input_is_one_line(tmp_path, llama_cache):
    res = invoke("export", tmp_path / "nope", "--format", "axolotl", "--out", tmp_path / "o")
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = invoke("export", llama_cache, "--format", "megatron", "--out", tmp_path / "o")
    assert res.exit_code == 2  # click's usage error names the choices
    assert not (tmp_path / "o").exists()
