"""Streaming the cache: complete, deterministic, resumable, rank-disjoint, padded little with token budgets;
micro-batches equal to per-example reads; DDP on two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.data.epoch_plan import PlanSettings, batches_in_epoch, plan_epoch
from pipeline.errors import KdError
from pipeline.losses.objective import KD_FIELDS
from pipeline.data.prepare import load_prepared
from pipeline.data.stream import CacheStream

from conftest import free_port


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("scache") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), shard_rows=150, chunk_rows=32))
    return out


def take(stream: CacheStream, n: int):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_one_epoch_covers_every_example_once(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    s = CacheStream(ds, cache, batch_size=7, seed=1)
    assert len(s.blocks) > 3  # blocks of the plan's grid over the data (pipeline/data/epoch_plan.py)
    n = s.batches_in_epoch(0)
    seen = [e for mb in take(s, n) for e in mb.examples]
    with_targets = [e for e in range(len(ds)) if cache.index.column("row_count")[e].as_py() > 0]
    assert sorted(seen) == with_targets
    assert s.epoch == 0 and s.cursor == len(seen)


def test_rows_are_joined_to_their_sequences(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    for mb in take(CacheStream(ds, cache, batch_size=5, seed=2), 4):
        assert mb.cache["topk_ids"].shape == (mb.num_targets, cache.k)
        # the cache's target ids (from the data, checked against each shard's hash) are the batch's targets
        rows = [cache.read(int(cache.index.column("row_start")[e].as_py()),
                           int(cache.index.column("row_start")[e].as_py() + cache.index.column("row_count")[e].as_py()),
                           ("target_ids",))["target_ids"] for e in mb.examples]
        assert np.array_equal(np.concatenate(rows), mb.target_ids.numpy())
        start = cache.index.column("row_start")[mb.examples[0]].as_py()
        first = cache.read(start, start + 1)
        assert np.array_equal(first["topk_ids"][0], mb.cache["topk_ids"][0].numpy())


def test_order_is_deterministic_per_seed_and_resumes_exactly(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    order = lambda seed: [mb.examples for mb in take(CacheStream(ds, cache, batch_size=4, seed=seed), 20)]  # noqa: E731
    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    s = CacheStream(ds, cache, batch_size=4, seed=0)
    take(s, 7)  # crosses into the second epoch (60 examples / 4 = 15 batches) when taken 20 total
    state = s.state_dict()
    resumed = CacheStream(ds, cache, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert [mb.examples for mb in take(resumed, 13)] == a[7:20]


def test_ranks_read_disjoint_blocks_and_take_equal_steps(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    r0 = CacheStream(ds, cache, batch_size=3, seed=4, rank=0, world=2)
    r1 = CacheStream(ds, cache, batch_size=3, seed=4, rank=1, world=2)
    n = r0.batches_in_epoch(0)
    assert n == r1.batches_in_epoch(0) > 0
    e0 = {e for mb in take(r0, n) for e in mb.examples}
    e1 = {e for mb in take(r1, n) for e in mb.examples}
    assert e0 and e1 and not (e0 & e1)


def test_more_ranks_than_blocks_says_so(prepared_dir, cache_dir):
    """Ranks split the data by whole blocks: more ranks than blocks is named as that, not as a batch size."""
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    blocks = len(CacheStream(ds, cache, batch_size=2, seed=0).blocks)
    with pytest.raises(KdError, match=rf"{blocks + 1} ranks but the data is {blocks} block\(s\) \(of \d+ target rows"):
        CacheStream(ds, cache, batch_size=2, seed=0, rank=blocks, world=blocks + 1)


def test_ddp_two_gloo_processes(tmp_path, prepared_dir, cache_dir, vocab_size):
    scfg = tmp_path / "student.json"
    scfg.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 16,
                                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "num_key_value_heads": 1, "max_position_embeddings": 128}))
    torchrun = Path(sys.executable).with_name("torchrun")
    kdcache = Path(sys.executable).with_name("kdcache")
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port}
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", port, str(kdcache), "train",
                           "--cache", str(cache_dir), "--student-config", str(scfg), "--out", str(out),
                           "--max-steps", "3", "--batch-size", "4", "--gate", "topk", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by rank 0
    assert (out / "final" / "config.json").is_file()


def expected_batch(ds, cache, examples: list[int], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A micro-batch rebuilt example by example in plain Python: padded ids, targets, cache rows."""
    width = max(len(ds[e]["input_ids"]) for e in examples)
    ids = np.zeros((len(examples), width), np.int64)
    att = np.zeros_like(ids)
    tb, tt, rows = [], [], []
    for b, e in enumerate(examples):
        seq, mask = ds[e]["input_ids"], ds[e]["loss_mask"]
        ids[b, :len(seq)], att[b, :len(seq)] = seq, 1
        for t in range(1, len(seq)):
            if mask[t]:
                tb.append(b)
                tt.append(t)
        if cache is not None:
            a = cache.index.column("row_start")[e].as_py()
            rows.append(cache.read(a, a + cache.index.column("row_count")[e].as_py(), fields))
    out = {"input_ids": ids, "attention_mask": att, "tgt_b": np.array(tb), "tgt_t": np.array(tt),
           "target_ids": ids[tb, tt]}
    for k in fields if cache is not None else ():
        out["cache." + k] = np.concatenate([r[k] for r in rows])
    return out


@pytest.mark.parametrize("settings", [dict(batch_size=7, buffer_blocks=2),  # batches straddle windows
                                      dict(batch_size=7, batch_tokens=150, buffer_blocks=3),
                                      dict(batch_size=7, batch_tokens=150, shuffle=False)])
def test_micro_batches_equal_per_example_reads(prepared_dir, cache_dir, settings):
    """Every tensor of every micro-batch of an epoch (vectorised collation, rows gathered across windows)
    equals the batch rebuilt from `ds[e]` and `cache.read` one example at a time."""
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    fields = tuple(f for f in KD_FIELDS if f != "target_rank")
    s = CacheStream(ds, cache, seed=3, threads=2, **settings)
    n = s.batches_in_epoch(0)
    if settings.get("batch_tokens") is None:
        assert any(a < b for a, b in s.plan(0).spans)  # the straddling case is exercised
    seen = []
    for mb in take(s, n):
        want = expected_batch(ds, cache, mb.examples, fields)
        got = {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask, "tgt_b": mb.tgt_b, "tgt_t": mb.tgt_t,
               "target_ids": mb.target_ids, **{"cache." + k: v for k, v in mb.cache.items()}}
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k].numpy(), want[k]), k
        seen += mb.examples
    assert sorted(seen) == [e for e in range(len(ds)) if cache.index.column("row_count")[e].as_py() > 0]


def test_token_budget_plan_on_varied_lengths():
    """A corpus of lengths from 3 to 512 (lognormal, like real text): each micro-batch within the budget
    (or one over-long example alone), every example once, padding under 8% (fixed batches: over 30%),
    deterministic per (seed, epoch), and DDP ranks disjoint with equal counts."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.5, 0.8, 6000), 3, 512).astype(np.int64)
    blocks = np.array_split(np.arange(6000), 60)
    shards = np.repeat(np.arange(6), 10)
    pad = lambda bs: 1 - sum(lengths[b].sum() for b in bs) / sum(len(b) * lengths[b].max() for b in bs)  # noqa: E731
    s = PlanSettings(batch_tokens=4096, seed=1)
    plan = plan_epoch(blocks, shards, lengths, s, epoch=0)
    assert all(len(b) * lengths[b].max() <= 4096 or len(b) == 1 for b in plan.batches)
    assert sorted(np.concatenate(plan.batches).tolist()) == list(range(6000))
    assert pad(plan.batches) < 0.08
    assert pad(plan_epoch(blocks, shards, lengths, PlanSettings(batch_size=40, seed=1), epoch=0).batches) > 0.3
    same = plan_epoch(blocks, shards, lengths, s, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(plan.batches, same.batches))
    other = plan_epoch(blocks, shards, lengths, s, epoch=1)
    assert [b.tolist() for b in other.batches] != [b.tolist() for b in plan.batches]
    n = batches_in_epoch(blocks, shards, lengths, s, epoch=0, world=3)
    ranks = [plan_epoch(blocks, shards, lengths, s, 0, r, 3) for r in range(3)]
    assert n == min(len(p.batches) for p in ranks) > 0
    sets = [set(np.concatenate(p.batches).tolist()) for p in ranks]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set.union(*sets) == set(range(6000))


def stdlib_pairs(n_files: int = 30, seed: int = 0) -> list[dict[str, str]]:
    """Real text with varied lengths: prompt -> completion tiles of Python standard-library sources
    (4..12 lines, then 1..3 lines), the way data/make_stdlib.py cuts them."""
    import random
    import sysconfig

    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("test"))[:n_files]
    out = []
    for p in files:
        lines = [ln.rstrip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
        i = 0
        while i + 5 < len(lines):
            a, b = rng.randint(4, 12), rng.randint(1, 3)
            out.append({"prompt": "\n".join(lines[i: i + a]), "response": "\n" + "\n".join(lines[i + a: i + a + b])})
            i += a + b
    return out


def test_padding_under_ten_percent_on_real_text(tmp_path, tokenizer_dir):
    """Python stdlib sources as prompt -> completion pairs: token budgets pad <= 10% where fixed batches of
    about the same size pad > 25%; the same examples either way."""
    from pipeline.data.prepare import PrepareConfig, prepare

    jsonl = tmp_path / "stdlib.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in stdlib_pairs()))
    prepare(PrepareConfig(data=str(jsonl), tokenizer=str(tokenizer_dir), out=str(tmp_path / "prep"), max_length=512))
    ds = load_prepared(tmp_path / "prep")
    lengths = np.array([len(x) for x in ds["input_ids"]])
    assert len(ds) > 1000 and lengths.std() > 0.3 * lengths.mean()  # varied lengths

    def epoch(**kw):
        s = CacheStream(ds, None, seed=0, **kw)
        mbs = take(s, s.batches_in_epoch(0))
        real = sum(int(mb.attention_mask.sum()) for mb in mbs)
        return 1 - real / sum(mb.attention_mask.numel() for mb in mbs), sorted(e for mb in mbs for e in mb.examples)

    budget = int(16 * lengths.mean())
    fixed, seen_fixed = epoch(batch_size=16)
    bucketed, seen = epoch(batch_size=16, batch_tokens=budget)
    print(f"padding: batch_size 16 {fixed:.1%}, batch_tokens {budget} {bucketed:.1%}")
    assert bucketed <= 0.10 < 0.25 < fixed, (bucketed, fixed)
    assert seen == seen_fixed


def test_token_budget_resumes_exactly_and_refuses_other_settings(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    kw = dict(batch_size=4, batch_tokens=120, seed=5, buffer_blocks=2)
    s = CacheStream(ds, cache, **kw)
    n = s.batches_in_epoch(0)
    straight = [mb.examples for mb in take(CacheStream(ds, cache, **kw), n + 5)]  # into epoch 1
    first = take(s, n - 2)
    state = s.state_dict()
    resumed = CacheStream(ds, cache, **kw)
    resumed.load_state_dict(state)
    assert [mb.examples for mb in first] + [mb.examples for mb in take(resumed, 7)] == straight
    with pytest.raises(KdError, match="batch_tokens"):
        CacheStream(ds, cache, **{**kw, "batch_tokens": 200}).load_state_dict(state)
