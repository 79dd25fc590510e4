"""The public API (pipeline/api.py): datasets aligned with the prepared data and the cache, a collator in the
trainer's layout, and KDLoss equal to a dense reference and to `kdcache train` on the same batches.

    .venv/bin/python -m pytest tests/interop/test_api.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.api import (KD_FIELDS, KDCollator, KDExampleDataset, KDIterableDataset, KDLoss, KDLossConfig, KdError,
                          as_microbatch, gather_target_logits, open_cache, student_target_logits)
from pipeline.data.prepare import load_prepared
from pipeline.data.stream import CacheStream
from pipeline.losses.objective import kd_fields

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    """Small shards and chunks, so examples cross chunk boundaries; tail draws for the sampled tail."""
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("apicache") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), shard_rows=150,
                              chunk_rows=32, tail_samples=4))
    return out


@pytest.fixture(scope="module")
def dataset(prepared_dir, cache_dir) -> KDExampleDataset:
    return KDExampleDataset(prepared_dir, cache_dir)


def targets_of(mask) -> list[int]:
    """Independent of pipeline.data.batching: positions t >= 1 whose loss_mask is set."""
    return [t for t in range(1, len(mask)) if mask[t]]


def test_examples_are_the_data_joined_to_their_cache_rows(prepared_dir, cache_dir, dataset):
    raw = load_prepared(prepared_dir)
    cache = open_cache(cache_dir)
    starts, counts = cache.index.column("row_start").to_pylist(), cache.index.column("row_count").to_pylist()
    assert list(dataset.examples) == [e for e in range(len(raw)) if counts[e] > 0]
    crossing = 0
    for i in range(len(dataset)):
        ex = dataset[i]
        e = ex["example"]
        ids, mask = raw[e]["input_ids"], raw[e]["loss_mask"]
        pos = targets_of(mask)
        assert ex["input_ids"].tolist() == ids
        assert ex["target_positions"].tolist() == pos
        assert ex["labels"].tolist() == [ids[t] if t in pos else -100 for t in range(len(ids))]
        # the default fields: what a default KDLoss of this cache reads (it has draws: the sampled tail's too)
        want = cache.read(starts[e], starts[e] + counts[e], KD_FIELDS + ("tail_ids", "tail_counts", "tail_logprobs"))
        assert set(ex["cache"]) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(ex["cache"][k].numpy(), v, err_msg=k)
        # the teacher's head holds the token each row predicts at target_rank
        rank = ex["cache"]["target_rank"]
        hit = rank >= 0
        assert torch.equal(ex["cache"]["topk_ids"][hit, rank[hit]], torch.tensor(ids)[torch.tensor(pos)][hit])
        crossing += starts[e] // 32 != (starts[e] + counts[e] - 1) // 32
    assert crossing > 0  # some examples span two chunks


def test_collated_batch_is_the_trainer_microbatch(prepared_dir, cache_dir, dataset):
    """KDCollator over the dataset's examples gives exactly what `kdcache train` streams."""
    # the fields the trainer streams under --tail auto from a cache with draws (the dataset's default)
    stream = CacheStream(load_prepared(prepared_dir), open_cache(cache_dir), batch_size=5, seed=3,
                         fields=kd_fields("sampled"))
    where = {int(e): i for i, e in enumerate(dataset.examples)}
    it = iter(stream)
    for _ in range(4):
        mb = next(it)
        batch = KDCollator()([dataset[where[e]] for e in mb.examples])
        got = as_microbatch(batch)
        for name in ("input_ids", "attention_mask", "tgt_b", "tgt_t", "target_ids"):
            assert torch.equal(getattr(got, name), getattr(mb, name)), name
        assert got.cache.keys() == mb.cache.keys() and got.examples == mb.examples
        for k in mb.cache:
            assert torch.equal(got.cache[k], mb.cache[k]), k
        labels = batch["labels"]
        assert torch.equal(labels[mb.tgt_b, mb.tgt_t], mb.target_ids)
        assert int((labels != -100).sum()) == mb.num_targets


def test_iterable_dataset_follows_the_trainer_order(prepared_dir, cache_dir, dataset):
    cache = open_cache(cache_dir)
    stream = CacheStream(load_prepared(prepared_dir), cache, batch_size=1, seed=4)
    it = iter(stream)
    trainer_order = [next(it).examples[0] for _ in range(stream.batches_in_epoch(0))]
    ids = KDIterableDataset(prepared_dir, cache_dir, seed=4)
    got = list(ids)
    assert [ex["example"] for ex in got] == trainer_order
    where = {int(e): i for i, e in enumerate(dataset.examples)}
    for ex in got[:10]:
        ref = dataset[where[ex["example"]]]
        assert torch.equal(ex["input_ids"], ref["input_ids"]) and torch.equal(ex["labels"], ref["labels"])
        for k in ref["cache"]:
            assert torch.equal(ex["cache"][k], ref["cache"][k]), k
    ids.set_epoch(1)
    assert [ex["example"] for ex in ids] != trainer_order  # a new epoch, a new order


def test_iterable_dataset_under_workers_and_ranks_reads_every_example_once(prepared_dir, cache_dir, dataset):
    ds = KDIterableDataset(prepared_dir, cache_dir, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=KDCollator())
    seen = [e for batch in loader for e in batch["examples"]]
    assert sorted(seen) == sorted(int(e) for e in dataset.examples)
    ranks = [[ex["example"] for ex in KDIterableDataset(prepared_dir, cache_dir, seed=1, rank=r, world=2)]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0]) & set(ranks[1])


# ---- KDLoss -------------------------------------------------------------------------------------------

def dense_reference(logits: torch.Tensor, cache: dict, target_ids: torch.Tensor, vocab: int, alpha: float) -> tuple:
    """Forward KL on K + 1 buckets at T = 1, written out in float64: the teacher's head and exact tail,
    the student's head from a softmax over the teacher's V ids and its tail as the remaining mass."""
    z = logits.double()[:, :vocab]
    q = torch.softmax(z, dim=-1)
    ids = cache["topk_ids"]
    p_head = cache["topk_logprobs"].double().exp()
    p_tail = cache["tail_logprob"].double().exp()
    q_head = q.gather(1, ids)
    q_tail = 1.0 - q_head.sum(1)
    kl = (p_head * (p_head.log() - q_head.log())).sum(1) + p_tail * (p_tail.log() - q_tail.log())
    ce = -torch.log_softmax(logits.double(), dim=-1).gather(1, target_ids[:, None])[:, 0]
    kd, ce = float(kl.mean()), float(ce.mean())
    return kd, ce, alpha * ce + (1 - alpha) * kd


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_kdloss_equals_a_dense_reference(cache_dir, dataset, alpha):
    cache = open_cache(cache_dir)
    batch = KDCollator()([dataset[i] for i in range(6)])
    n, vocab = batch["target_ids"].shape[0], cache.vocab_size
    logits = (torch.randn(n, vocab + 3, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    kd = KDLoss.from_cache(cache, KDLossConfig(ce_weight=alpha, tail="bucket"))  # the reference's K + 1 buckets
    out = kd(logits, batch)
    # the padded head's 3 extra ids belong to no distribution in the KD term (they do in CE, as in training)
    ref_kd, ref_ce, ref_loss = dense_reference(logits.detach(), batch["cache"], batch["target_ids"], vocab, alpha)
    assert out.metrics["kd_loss"] == pytest.approx(ref_kd, rel=1e-5)
    assert out.metrics["ce_loss"] == pytest.approx(ref_ce, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(ref_loss, rel=1e-5)
    assert out.metrics["tar"] == 1.0 and out.metrics["kept_fraction"] == 1.0 and out.metrics["focus_ratio"] == 1.0
    out.loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


API_REFERENCE_SETTINGS = [  # on K + 1 buckets, the reference's teacher (the sampled tail: tests/losses/test_sampled*)
    dict(loss="akl", gate="topk", gate_k=4, reject_weight=0.25, select="student_entropy", select_ratio=0.5,
         latf=True, idts=True, temperature=1.2, ce_weight=0.25, tail="bucket"),
    dict(loss="srkl", gate="threshold", gate_threshold=0.01, reject_weight=0.5, latf=True, idts=True, idts_c=0.6,
         tail="bucket"),
]


@pytest.mark.parametrize("settings", API_REFERENCE_SETTINGS, ids=lambda s: s["loss"])
def test_kdloss_equals_the_float64_reference_with_every_method(cache_dir, dataset, settings):
    """KDLoss (gate, SE-KD per sequence, LATF, IDTS at T_base, α·CE) on real cache rows against the float64
    reference of tests/losses/reference.py, written from docs/methods.md: loss, kd_loss, ce_loss and the gradient
    with respect to the logits. The teacher at each row's temperature comes from the batch's decoded cache fields
    by the documented PCHIP rule, computed by the reference itself."""
    from tests.losses import reference as R

    cache = open_cache(cache_dir)
    batch = KDCollator()([dataset[i] for i in range(8)])
    n, vocab = batch["target_ids"].shape[0], cache.vocab_size
    logits = (torch.randn(n, vocab + 3, generator=torch.Generator().manual_seed(5)) * 2).requires_grad_()
    kd = KDLoss.from_cache(cache, KDLossConfig(total_steps=10, **settings))
    kd.latf._ratio = 0.6  # a narrowed focus: LATF's selection matters
    out = kd(logits, batch)
    (g_got,) = torch.autograd.grad(out.loss, logits)
    fields = {f: (x.double() if x.is_floating_point() else x) for f, x in batch["cache"].items()}
    fields["betas"] = torch.tensor([1.0 / t for t in cache.temperatures], dtype=torch.float64)
    plan = R.plan(logits.detach(), fields, vocab, gate_rule=settings["gate"], gate_k=settings.get("gate_k"),
                  threshold=settings.get("gate_threshold"), reject_weight=settings["reject_weight"],
                  select_ratio=settings.get("select_ratio"), groups=batch["tgt_b"].tolist(), latf_ratio=0.6,
                  idts=True, t_base=settings.get("temperature", 1.0), idts_c=settings.get("idts_c", 0.5))
    assert 0 < sum(plan.keep) < n and any(w < 1 for w, k in zip(plan.weight, plan.keep) if k)
    x = logits.detach().double().requires_grad_()
    num, den, _ = R.kd_sums(settings["loss"], x, plan, R.fields_teacher(fields, vocab), fields["topk_ids"], vocab)
    kd_loss = R.kd_loss(num, den)
    ce = -torch.log_softmax(x, dim=-1).gather(1, batch["target_ids"][:, None]).mean()
    alpha = settings.get("ce_weight", 0.0)
    loss = alpha * ce + (1 - alpha) * kd_loss
    (g_want,) = torch.autograd.grad(loss, x)
    assert out.metrics["kept_fraction"] == pytest.approx(sum(plan.keep) / n)
    assert out.metrics["tar"] == pytest.approx(plan.accepted / n)
    assert out.metrics["kd_loss"] == pytest.approx(float(kd_loss.detach()), rel=2e-5)
    assert out.metrics["ce_loss"] == pytest.approx(float(ce.detach()), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=2e-5)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-7)


def student_config(tmp_path: Path, vocab_size: int) -> str:
    p = tmp_path / "student.json"
    p.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    return str(p)


METHODS = [
    {"loss": "fkl", "gate": "spec", "proposal": "sample", "latf": True, "latf_warmup": 0.25, "latf_epsilon": 0.0,
     "idts": True, "ce_weight": 0.3},
    {"loss": "jsd", "gate": "topk", "gate_k": 6, "reject_weight": 0.1},
    {"loss": "akl", "gate": "threshold", "gate_threshold": 0.02, "reject_weight": 0.25, "ce_weight": 0.5,
     "temperature": 1.5},
    {"loss": "fkl", "tail": "sampled"},
]


@pytest.mark.parametrize("settings", METHODS, ids=lambda s: "-".join(f"{k}={v}" for k, v in list(s.items())[:3]))
def test_kdloss_gives_the_numbers_of_kdcache_train(tmp_path, prepared_dir, cache_dir, dataset, vocab_size, settings):
    """Same micro-batches, same weights, same seeds: KDLoss's loss, metrics and gradients are the trainer's,
    step after step (LATF's ratio moves: epsilon 0 makes every change of the loss average count)."""
    from transformers import AutoModelForCausalLM

    from pipeline.training.trainer import Trainer
    from pipeline.training.config import TrainConfig

    cfg = TrainConfig(data=str(prepared_dir), cache=str(cache_dir), student_config=student_config(tmp_path, vocab_size),
                      out=str(tmp_path / "run"), batch_size=4, grad_accum=1, max_steps=6, max_grad_norm=0.0,
                      seed=7, lr=1e-2, **settings)
    trainer = Trainer(cfg)
    student = AutoModelForCausalLM.from_config(trainer.model.config)
    kd = KDLoss.from_cache(cache_dir, KDLossConfig.from_train_config(cfg, total_steps=trainer.total))
    if cfg.tail == "sampled":  # the draws, and their log-probs: what the loss needs is `kd.fields`
        assert kd.fields == KD_FIELDS + ("tail_ids", "tail_counts", "tail_logprobs")
        dataset = KDExampleDataset(prepared_dir, cache_dir, fields=kd.fields)
    where = {int(e): i for i, e in enumerate(dataset.examples)}
    collate = KDCollator()
    it = iter(trainer.stream)
    ratios, kept = [], []
    for _ in range(cfg.max_steps):
        mb = next(it)
        student.load_state_dict(trainer.model.state_dict())  # the weights this step starts from
        row = trainer.train_step([mb])  # max_grad_norm 0: .grad keeps the unclipped gradient
        batch = collate([dataset[where[e]] for e in mb.examples])
        student.zero_grad(set_to_none=True)
        out = kd(student_target_logits(student, batch), batch)
        out.loss.backward()
        for k in ("loss", "kd_loss", "ce_loss", "tar", "focus_ratio", "temp_mean", "temp_min", "temp_max",
                  "kept_fraction"):
            if row[k] is None:  # no position kept: no temperature
                assert out.metrics[k] is None, k
            else:
                assert out.metrics[k] == pytest.approx(row[k], rel=1e-5, abs=1e-7), k
        for (name, a), b in zip(student.named_parameters(), trainer.model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
        ratios.append(row["focus_ratio"])
        kept.append(row["kept_fraction"])
    assert max(kept) > 0  # the divergence itself was compared
    if settings.get("latf"):
        a, b = kd.latf.state_dict(), trainer.latf.state_dict()
        assert len(set(ratios)) > 1 and a.keys() == b.keys()
        for k in a:  # the trainer's KD sums are float64 per chunk (divergences.bucket_kd_grad): equal to ~1e-8
            assert a[k] == (b[k] if not isinstance(b[k], float) else pytest.approx(b[k], rel=1e-6)), k


def test_full_logits_and_target_logits_agree(cache_dir, dataset, llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    batch = KDCollator()([dataset[i] for i in range(3)])
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(gather_target_logits(full, batch), student_target_logits(model, batch),
                               rtol=1e-5, atol=1e-5)


def test_state_dict_resumes_latf_and_the_gate_stream(cache_dir, dataset):
    cfg = KDLossConfig(gate="spec", proposal="sample", latf=True, latf_warmup=0.1, latf_epsilon=0.0, total_steps=20,
                       tail="bucket")
    batches = [KDCollator()([dataset[i] for i in range(j, j + 4)]) for j in range(0, 24, 4)]
    logits = [torch.randn(b["target_ids"].shape[0], 400, generator=torch.Generator().manual_seed(j))
              for j, b in enumerate(batches)]
    straight = KDLoss.from_cache(cache_dir, cfg)
    ref = [straight(x, b).metrics for x, b in zip(logits, batches)]
    first = KDLoss.from_cache(cache_dir, cfg)
    for x, b in zip(logits[:3], batches[:3]):
        first(x, b)
    state = first.state_dict()
    resumed = KDLoss.from_cache(cache_dir, cfg)
    resumed.load_state_dict(state)
    assert [resumed(x, b).metrics for x, b in zip(logits[3:], batches[3:])] == ref[3:]
    assert ref[-1]["focus_ratio"] < 1.0


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_batches_that_do_not_fit_name_the_teachers_vocabulary_and_k(cache_dir, dataset):
    cache = open_cache(cache_dir)
    batch = KDCollator()([dataset[0], dataset[1]])
    n = batch["target_ids"].shape[0]
    kd = KDLoss.from_cache(cache)
    with pytest.raises(KdError) as e:
        kd(torch.randn(n, cache.vocab_size - 1), batch)
    assert f"teacher's vocabulary (the cache's V) has {cache.vocab_size}" in one_line(e)
    other_k = KDLoss(KDLossConfig(), cache.vocab_size, cache.temperatures, cache.k + 2)
    with pytest.raises(KdError) as e:
        other_k(torch.randn(n, cache.vocab_size), batch)
    assert f"K = {cache.k + 2}" in one_line(e) and f"V = {cache.vocab_size}" in one_line(e)
    with pytest.raises(KdError) as e:
        kd(torch.randn(n + 1, cache.vocab_size), batch)
    assert "rows of logits" in one_line(e)
    with pytest.raises(KdError) as e:
        kd(torch.randn(n, cache.vocab_size), {**batch, "cache": {"topk_ids": batch["cache"]["topk_ids"]}})
    assert "lack" in one_line(e)
    with pytest.raises(KdError) as e:
        KDLoss.from_cache(cache, KDLossConfig(gate="topk", gate_k=cache.k + 1))
    assert f"K = {cache.k}" in one_line(e)
    with pytest.raises(KdError) as e:
        KDLossConfig(latf=True)
    assert "total_steps" in one_line(e)
    with pytest.raises(KdError):
        KDLossConfig(loss="nope")


def test_other_data_is_refused(tmp_path, cache_dir, data_file, tokenizer_dir):
    from pipeline.data.prepare import PrepareConfig, prepare

    other = tmp_path / "other"
    prepare(PrepareConfig(data=str(data_file), tokenizer=str(tokenizer_dir), out=str(other), max_length=32))
    with pytest.raises(KdError) as e:
        KDExampleDataset(other, cache_dir)
    assert "other data" in one_line(e)


def test_hf_iterable_view_collates_to_the_same_batch(dataset):
    """TRL reads the examples through `datasets` as Python lists; the batch must come back bit-exact."""
    from pipeline.api import to_hf_iterable

    view = list(to_hf_iterable(dataset).take(6))
    a, b = KDCollator()(view), KDCollator()([dataset[i] for i in range(6)])
    assert a["examples"] == b["examples"]
    for k in ("input_ids", "attention_mask", "labels", "tgt_b", "tgt_t", "target_ids"):
        assert torch.equal(a[k], b[k]), k
    for k in b["cache"]:
        assert a["cache"][k].dtype == b["cache"][k].dtype and torch.equal(a["cache"][k], b["cache"][k]), k


@pytest.mark.parametrize("config", [dict(loss="fkl", ce_weight=0.2), dict(loss="rkl", gate="topk", gate_k=3,
                                                                            reject_weight=0.5, idts=True)])
def test_from_hidden_equals_forward_on_logits(tmp_path, cache_dir, dataset, vocab_size, config):
    # The chunked path (hidden states + head, 7 rows per chunk) against the same KDLoss on full logits, with a
    # student that is not the teacher (another seed, a padded head).
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_model
    from pipeline.training.student import target_hidden

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", vocab_size + 3, tmp_path / "s", seed=9))
    batch = KDCollator()([dataset[i] for i in range(4)])
    kd_a = KDLoss.from_cache(cache_dir, KDLossConfig(**config)).eval()
    kd_b = KDLoss.from_cache(cache_dir, KDLossConfig(**config)).eval()
    hidden = target_hidden(model, batch["input_ids"], batch["attention_mask"], batch["tgt_b"], batch["tgt_t"])
    want = kd_a(student_target_logits(model, batch), batch)
    g_want = torch.autograd.grad(want.loss, [p for p in model.parameters()], allow_unused=True, retain_graph=True)
    hidden = target_hidden(model, batch["input_ids"], batch["attention_mask"], batch["tgt_b"], batch["tgt_t"])
    got = kd_b.from_hidden(hidden, model, batch, chunk_rows=7)
    g_got = torch.autograd.grad(got.loss, [p for p in model.parameters()], allow_unused=True)
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    assert want.metrics["kd_loss"] > 0.05  # a real distance to the teacher, not float noise
    for key in ("kd_loss", "ce_loss", "tar", "kept_fraction"):
        assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(g_got, g_want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_iterable_dataset_on_a_remote_cache_fetches_ahead_in_the_order_it_reads(prepared_dir, cache_dir, tmp_path):
    """A cache on an object store, read by the API's iterable dataset: the local copy is told the epoch's shard
    order (shuffled blocks, not shard order), and that is the order the shards are first read in."""
    import fsspec

    from pipeline.cache import layout, remote
    from pipeline.storage import store_for

    url = "memory://kdtest-api/cache"
    store = store_for(url)
    for i in layout.committed_shards(cache_dir):
        remote.commit_shard(store, i, layout.shard_dir(cache_dir, i), layout.read_commit(cache_dir, i))
    remote.upload_plan(store, cache_dir)
    try:
        cache = open_cache(url, local_cache=tmp_path / "copy", prefetch=2)
        hinted: list[list[int]] = []
        read: list[int] = []
        hint, reading = cache.mirror.hint, cache.mirror.reading
        cache.mirror.hint = lambda order: (hinted.append(list(order)), hint(order))[1]
        cache.mirror.reading = lambda i: (read.append(i), reading(i))[1]
        got = [ex["example"] for ex in KDIterableDataset(prepared_dir, cache, seed=4)]
        cache.mirror.close()
        first_use = list(dict.fromkeys(read))
        assert hinted and hinted[-1] == first_use and first_use != sorted(first_use)
        assert len(got) == len(KDExampleDataset(prepared_dir, cache_dir))
    finally:
        fsspec.filesystem("memory").rm("/kdtest-api", recursive=True)
