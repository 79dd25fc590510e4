"""`kdcache export`: each format read back with `datasets.load_from_disk` holds the cache's rows (ids equal,
log-probs equal in float32) on the positions its consumer reads them from, checked against `Cache.read`,
the prepared data, and the teacher model itself; axolotl's and DistillKit's layouts are also read the way
their code reads them (a few lines of their column access, reimplemented here: neither is installed), in
the narrowest types those readers accept, and the metadata and summary line say the log-probs are at T = 1
and name every cache field left out.

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
from pipeline.interop.export_layouts import DISTILLKIT, LAYOUTS, columns_of
from pipeline.data.prepare import load_prepared
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAD = -1e9
OUTPUT: dict[str, str] = {}  # format -> what `kdcache export` printed (filled by the `exports` fixture)


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
        OUTPUT[fmt] = res.output
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


def value_types(ds) -> dict[str, str]:
    return {c: (f.feature.feature if hasattr(f.feature, "feature") else f.feature).dtype
            for c, f in ds.features.items()}


def test_axolotl_export_puts_row_j_on_token_j_plus_1(exports, reference):
    ds = load(exports["axolotl"])
    assert value_types(ds) == {"input_ids": "int32", "attention_mask": "int8", "labels": "int32",
                               "target_token_ids": "int32", "target_logprobs": "float32", "target_mask": "bool"}
    k = reference["cache"].k
    for e in range(len(ds)):
        row, ids, mask = ds[e], reference["ids"][e], reference["mask"][e]  # Python lists, as the Trainer reads
        L, pos = len(ids), targets_of(mask)
        assert row["input_ids"] == ids and row["attention_mask"] == [1] * L
        labels = row["labels"]
        assert labels == [ids[t] if t in pos else -100 for t in range(L)]
        tid, tlp, tm = (row[c] for c in ("target_token_ids", "target_logprobs", "target_mask"))
        assert len(tid) == len(tlp) == len(tm) == L
        want = rows_of(reference, e)
        for j in range(L):
            # axolotl's loss: row j describes input_ids[j + 1], masked by labels[j + 1]
            if j + 1 < L and labels[j + 1] != -100:
                i = pos.index(j + 1)
                assert tm[j] == [True] * k
                assert tid[j] == want["topk_ids"][i].tolist()
                np.testing.assert_array_equal(np.float32(tlp[j]), want["topk_logprobs"][i])
            else:  # no teacher data: empty, axolotl's collator pads it (id 0, log-prob -1e9, mask 0)
                assert tm[j] == tid[j] == tlp[j] == []


def test_distillkit_export_is_the_capture_layout_and_never_trains_a_padding_row(exports, reference):
    ds = load(exports["distillkit"])
    assert value_types(ds) == {"input_ids": "int32", "labels": "int32", "token_ids": "int32", "top_values": "float32"}
    k = reference["cache"].k
    assert ds.features["token_ids"].feature.length == ds.features["top_values"].feature.length == k  # fixed-size
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


# ---- the readers' own column access (reimplemented from their source; see docs/api.md "Export") -------------

def axolotl_collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """What axolotl's `DataCollatorForKD` (src/axolotl/integrations/kd/collator.py) does with the KD columns of
    Python-list rows: labels padded with -100 to the longest; each teacher row shorter than the batch's
    longest padded with log-prob -1e9, id 0, mask 0, each sequence to the batch length with such rows;
    tensors float / long / int."""
    max_len = max(len(f["labels"]) for f in features)
    max_k = max(len(r) for f in features for r in f["target_logprobs"])
    out = {"labels": [], "target_logprobs": [], "target_token_ids": [], "target_mask": []}
    for f in features:
        out["labels"].append(list(f["labels"]) + [-100] * (max_len - len(f["labels"])))
        lps, ids, ms = [], [], []
        for lp, i, m in zip(f["target_logprobs"], f["target_token_ids"], f["target_mask"]):
            pad = max_k - len(lp)
            lps.append(lp + [-1e9] * pad if pad > 0 else lp[:max_k])
            ids.append(i + [0] * pad if pad > 0 else i[:max_k])
            ms.append(m + [0] * pad if pad > 0 else m[:max_k])
        extra = max_len - len(lps)
        out["target_logprobs"].append(lps + [[-1e9] * max_k] * extra)
        out["target_token_ids"].append(ids + [[0] * max_k] * extra)
        out["target_mask"].append(ms + [[0] * max_k] * extra)
    return {"labels": torch.tensor(out["labels"]),
            "target_logprobs": torch.tensor(out["target_logprobs"], dtype=torch.float),
            "target_token_ids": torch.tensor(out["target_token_ids"], dtype=torch.long),
            "target_mask": torch.tensor(out["target_mask"], dtype=torch.int)}


def test_axolotl_export_read_as_axolotls_collator_and_loss_read_it(exports, reference):
    """Batches of 8 rows through the collator, then the fused loss's pairing (kernels/liger.py): rows flattened
    with the hidden states, no shift; labels padded by one and shifted for the CE; mask per (row, k) as bool.
    Every row the loss trains is the cache's row of the token that position predicts, in float32."""
    ds = load(exports["axolotl"])
    k = reference["cache"].k
    trained = 0
    for a in range(0, len(ds), 8):
        b = axolotl_collate([ds[e] for e in range(a, min(a + 8, len(ds)))])
        assert b["target_token_ids"].dtype == torch.long and b["target_logprobs"].dtype == torch.float32
        n_seq, max_len, kk = b["target_token_ids"].shape
        assert kk == k and b["target_mask"].shape == b["target_logprobs"].shape == (n_seq, max_len, k)
        ids_flat = b["target_token_ids"].reshape(-1, k)
        lp_flat = b["target_logprobs"].reshape(-1, k)
        valid = b["target_mask"].reshape(-1, k).to(torch.bool)
        ce_labels = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
        # the KD mask is exactly the rows the loss's CE trains: every target gets the teacher, nothing else does
        assert torch.equal(valid.all(-1), ce_labels != -100) and torch.equal(valid.any(-1), valid.all(-1))
        for r in torch.nonzero(valid.all(-1)).flatten().tolist():
            e, j = a + r // max_len, r % max_len
            i = targets_of(reference["mask"][e]).index(j + 1)
            want = rows_of(reference, e)
            assert ce_labels[r].item() == reference["ids"][e][j + 1]
            assert ids_flat[r].tolist() == want["topk_ids"][i].tolist()
            np.testing.assert_array_equal(lp_flat[r].numpy(), want["topk_logprobs"][i])  # bit-exact float32
            trained += 1
        pad_rows = ~valid.any(-1)
        assert (ids_flat[pad_rows] == 0).all() and (lp_flat[pad_rows] == np.float32(PAD)).all()
    assert trained == reference["cache"].num_rows  # every cache row reaches the loss once


def distillkit_packed_batches(ds, max_len: int) -> list[tuple[dict[str, torch.Tensor], list[tuple[int, int]]]]:
    """DistillKit's path for raw top-k rows: pack_logits.py's `_truncate_row` (input_ids / labels cut to
    len(token_ids)), whole examples concatenated into one packed row while they fit (`pack_pass`), then
    main.py's `collate_packed_batch` (torch.tensor of each column's Python lists; a batch of one packed row
    here) and `LogprobCompressor.decompress_to_sparse` (token_ids, top_values as they are). Returns the
    batches with the (example, position) of every packed position."""
    packed, cur, where = [], {"input_ids": [], "labels": [], "token_ids": [], "top_values": []}, []
    for e in range(len(ds)):
        row = ds[e]
        n = len(row["token_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_len:
            packed.append((cur, where))
            cur, where = {c: [] for c in cur}, []
        for c in ("input_ids", "labels"):
            cur[c] += row[c][:n]
        for c in ("token_ids", "top_values"):
            cur[c] += row[c]
        where += [(e, j) for j in range(n)]
    packed.append((cur, where))
    return [({c: torch.tensor([v]) for c, v in p.items()}, w) for p, w in packed]


def test_distillkit_export_read_as_pack_logits_and_its_collator_read_it(exports, reference):
    """Row j of a packed batch meets the student's logits at j and trains where labels[j] >= 0 (trainer.py,
    lossfuncs/common.py, unshifted): every such row is the cache's row of token j + 1 of the same example, in
    float32, and 1 - the sum of its K probabilities (symmetric_uniform's missing mass) is the cache's tail."""
    ds = load(exports["distillkit"])
    k = reference["cache"].k
    trained = 0
    for batch, where in distillkit_packed_batches(ds, 64):
        ids, vals = batch["token_ids"], batch["top_values"]
        assert ids.dtype == torch.long and vals.dtype == torch.float32
        assert ids.shape == vals.shape == (*batch["input_ids"].shape, k)  # get_logprobs' shape check
        for p in torch.nonzero(batch["labels"][0] >= 0).flatten().tolist():
            e, j = where[p]
            i = targets_of(reference["mask"][e]).index(j + 1)
            want = rows_of(reference, e)
            assert ids[0, p].tolist() == want["topk_ids"][i].tolist()
            np.testing.assert_array_equal(vals[0, p].numpy(), want["topk_logprobs"][i])
            missing = 1.0 - torch.exp(vals[0, p].double()).sum().item()
            assert missing == pytest.approx(float(np.exp(np.float64(want["tail_logprob"][i]))), abs=1e-6)
            trained += 1
    # one-span examples: only each span's first token (no row before it is labelled) misses the KD term
    assert trained == reference["cache"].num_rows - sum(1 for m in reference["mask"] if targets_of(m))


def test_axolotl_and_distillkit_exports_are_the_narrowest_layouts(exports, reference):
    """Bytes per target row (Arrow data files / cache rows) within 8 KiB of what the columns' values and
    offsets need at the types the readers accept: int32 ids and labels, int8 attention mask, float32
    log-probs; axolotl's mask in bits and its rows without teacher data empty, DistillKit's rows fixed-size."""
    n, k, E = reference["cache"].num_rows, reference["cache"].k, len(reference["ids"])
    T = sum(len(x) for x in reference["ids"])
    need = {"axolotl": T * (4 + 1 + 4) + 6 * (E + 1) * 4 + 3 * (T + 1) * 4 + n * k * (4 + 4) + -(-n * k // 8),
            "distillkit": T * (4 + 4) + 4 * (E + 1) * 4 + (T - E) * k * (4 + 4)}
    for fmt, b in need.items():
        meta = json.loads((exports[fmt] / "kdcache_export.json").read_text())
        on_disk = sum(p.stat().st_size for p in exports[fmt].glob("data-*.arrow"))
        assert meta["data_bytes"] == on_disk and meta["bytes_per_target_row"] == pytest.approx(on_disk / n)
        assert on_disk <= b + 8192, (fmt, on_disk / n, b / n)
        assert load(exports[fmt]).data.nbytes <= b
        assert f"{on_disk / n:.0f} bytes/row" in OUTPUT[fmt]


def test_metadata_and_summary_say_t1_and_name_every_dropped_field(exports, reference):
    cache = reference["cache"]
    grid = ", ".join(f"{t:g}" for t in cache.temperatures)
    assert cache.tail_samples > 0  # the reference cache has tail draws: they must be named
    all_fields = ["tail_logprob", "target_logprobs", "target_rank", "entropy", "log_partition", "tail_entropy",
                  "tail_log_partition", "tail_ids", "tail_counts"]
    for fmt, path in exports.items():
        meta = json.loads((path / "kdcache_export.json").read_text())
        assert meta["logprob_temperature"] == 1.0 and "T = 1" in meta["logprobs"]
        assert "temperatures" not in meta  # the grid belongs to the dropped statistics, not to the export
        kept = set(LAYOUTS[fmt].keeps)
        assert list(meta["dropped"]) == [f for f in all_fields if f not in kept]
        assert grid in meta["dropped"]["log_partition"] and grid in meta["dropped"]["tail_log_partition"]
        line = OUTPUT[fmt].strip().splitlines()[-1]
        assert "log-probs at T = 1)" in line
        assert line.endswith("; dropped: " + ", ".join(meta["dropped"]))


def test_an_export_at_a_url_is_what_load_from_disk_reads_there(exports, tmp_path):
    """--out memory://...: the same rows as the local export, read by `datasets.load_from_disk(URL)`; a second
    export there is refused without --overwrite, and with it replaces only its own objects."""
    import uuid

    import datasets

    from pipeline.storage import store_for

    url = f"memory://kdexport-{uuid.uuid4().hex[:8]}/axolotl"
    cache = json.loads((exports["axolotl"] / "kdcache_export.json").read_text())["cache"]
    res = invoke("export", cache, "--format", "axolotl", "--out", url, "--batch-examples", 7)
    assert res.exit_code == 0, res.output
    remote, local = datasets.load_from_disk(url), load(exports["axolotl"])
    assert remote.column_names == local.column_names and remote.to_dict() == local.to_dict()
    s = store_for(url)
    assert json.loads(s.read_bytes("kdcache_export.json"))["out"] == url
    res = invoke("export", cache, "--format", "distillkit", "--out", url)
    assert res.exit_code == 1 and "--overwrite" in res.output
    s.write_bytes("notes.txt", b"mine")
    res = invoke("export", cache, "--format", "distillkit", "--out", url, "--overwrite")
    assert res.exit_code == 1 and "notes.txt is not a file `kdcache export` writes" in res.output
    s.delete(["notes.txt"])
    res = invoke("export", cache, "--format", "distillkit", "--out", url, "--overwrite")
    assert res.exit_code == 0, res.output
    # (load_from_disk copies a URL into one temporary directory per URL and process: read the schema here)
    assert '"token_ids"' in s.read_bytes("dataset_info.json").decode()
    assert json.loads(s.read_bytes("kdcache_export.json"))["format"] == "distillkit"
