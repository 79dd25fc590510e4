"""The online reference arm (`online_teacher`: the teacher run on every micro-batch, its full distribution as K = V
rows) against the truth: its rows against the float64 softmax of the teacher's own logits, and one student step
against float64 autograd of dense KD (tests/losses/reference.py, no pipeline code), at T = 1 and with IDTS.

    .venv/bin/python -m pytest tests/training/test_online.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from losses import reference as R
from pipeline.data.prepare import load_prepared, prepared_meta
from pipeline.errors import KdError
from pipeline.losses.options import KdOptions
from pipeline.training.config import TrainConfig
from pipeline.training.online import OnlineTeacher
from pipeline.training.student import StudentObjective
from pipeline.training.trainer import train

from conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CE_SCALE, KD_SCALE = 0.3, 0.7


def batch(prepared, n: int = 4):
    """The first n examples, right-padded: input_ids, attention_mask [B, L], tgt_b, tgt_t, target_ids [N]."""
    ds = load_prepared(prepared)
    ex = [(np.asarray(ds[i]["input_ids"]), np.nonzero(np.asarray(ds[i]["loss_mask"]))[0]) for i in range(n)]
    ex = [(e, t[t >= 1]) for e, t in ex]
    width = max(len(e) for e, _ in ex)
    ids = torch.zeros(len(ex), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, (e, _) in enumerate(ex):
        ids[b, : len(e)] = torch.from_numpy(e)
        att[b, : len(e)] = 1
    tgt_b = torch.cat([torch.full((len(t),), b) for b, (_, t) in enumerate(ex)])
    tgt_t = torch.from_numpy(np.concatenate([t for _, t in ex]))
    return ex, ids, att, tgt_b, tgt_t, ids[tgt_b, tgt_t]


def teacher_logp64(model_dir, ex, vocab: int) -> torch.Tensor:
    """float64 log-softmax of the teacher's own forward logits at every target, each example alone, unpadded."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().double()
    with torch.no_grad():
        z = torch.cat([m(input_ids=torch.from_numpy(e)[None]).logits[0, torch.from_numpy(t - 1)] for e, t in ex])
    return torch.log_softmax(z[:, :vocab], dim=-1)


def test_rows_are_the_teachers_full_softmax(llama_dir, prepared_dir, vocab_size):
    ex, ids, _, tgt_b, tgt_t, tgt = batch(prepared_dir)
    online = OnlineTeacher(str(llama_dir), torch.device("cpu"), prepared_meta(prepared_dir)["tokenizer"])
    rows = online.rows(ids, tgt_b, tgt_t, tgt)
    ref = teacher_logp64(llama_dir, ex, vocab_size)
    assert rows["topk_ids"].shape == (len(tgt), vocab_size) and online.k == vocab_size
    assert torch.equal(rows["topk_ids"].sort(dim=1).values, torch.arange(vocab_size).expand(len(tgt), -1))
    got = rows["topk_logprobs"].double()
    assert float((got - ref.gather(1, rows["topk_ids"])).abs().max()) < 1e-5  # float32 teacher vs float64
    assert bool((got[:, :-1] >= got[:, 1:]).all())  # descending
    assert bool(torch.isneginf(rows["tail_logprob"]).all()) and bool(torch.isneginf(rows["tail_log_partition"]).all())
    assert torch.equal(rows["topk_ids"].gather(1, rows["target_rank"][:, None])[:, 0], tgt)


@pytest.mark.parametrize("idts", [False, True])
def test_student_step_equals_float64_dense_kd(llama_dir, prepared_dir, vocab_size, tmp_path, idts):
    from transformers import AutoModelForCausalLM

    ex, ids, att, tgt_b, tgt_t, tgt = batch(prepared_dir)
    online = OnlineTeacher(str(llama_dir), torch.device("cpu"), prepared_meta(prepared_dir)["tokenizer"])
    rows = online.rows(ids, tgt_b, tgt_t, tgt)
    student = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", vocab_size, tmp_path / "s", seed=5))
    s64 = AutoModelForCausalLM.from_pretrained(tmp_path / "s").double()
    grid = torch.tensor([1.0 / t for t in online.temperatures])
    t_base = 1.0 if idts else 1.5
    s = KdOptions(loss="fkl", temperature=t_base, idts=idts)
    objective = StudentObjective(student, s, online.vocab_size, grid, None, None, chunk_rows=7)
    loss, plan, _, _ = objective(ids, att, tgt_b, tgt_t, tgt, rows, scales=lambda _: (CE_SCALE, KD_SCALE))
    loss.backward()

    # The truth: dense KD against the float64 teacher (every id its own bucket), float64 autograd.
    logits = torch.cat([s64(input_ids=torch.from_numpy(e)[None]).logits[0, torch.from_numpy(t - 1)] for e, t in ex])
    logp = teacher_logp64(llama_dir, ex, vocab_size)
    fields = R.cache_fields(logp, vocab_size, online.temperatures)
    r_plan = R.plan(logits.detach(), fields, vocab_size, t_base=t_base, idts=idts)
    kd, _, _ = R.kd_sums("fkl", logits, r_plan, R.dense_teacher(logp, fields["topk_ids"]), fields["topk_ids"], vocab_size)
    ce = -torch.log_softmax(logits, -1).gather(1, tgt[:, None]).sum()
    want = CE_SCALE * ce + KD_SCALE * kd
    want.backward()
    if idts:  # IDTS moved the temperatures off T_base: the check covers re-tempering of the exact rows
        assert float(plan.temps[plan.keep].std()) > 0.01
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    ref = dict(s64.named_parameters())
    worst = max(float((p.grad.double() - ref[n].grad).abs().max()) / float(ref[n].grad.abs().max())
                for n, p in student.named_parameters())
    assert worst < 1e-4


def test_online_arm_trains_and_refuses_bad_settings(llama_dir, prepared_dir, vocab_size, tmp_path):
    cfg = json.dumps({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "max_position_embeddings": 128, "tie_word_embeddings": True})
    (tmp_path / "s.json").write_text(cfg)
    s = train(TrainConfig(data=str(prepared_dir), online_teacher=str(llama_dir), student_config=str(tmp_path / "s.json"),
                          out=str(tmp_path / "run"), max_steps=2, batch_size=4, device="cpu", dtype="float32",
                          loss="rkl", gate="topk", gate_k=5, latf=True, idts=True))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert s["steps"] == 2 and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    with pytest.raises(KdError, match="either a cache or an online teacher"):
        TrainConfig(data=str(prepared_dir), online_teacher=str(llama_dir), cache=str(tmp_path))
    with pytest.raises(KdError, match="online teacher has no tail"):
        TrainConfig(data=str(prepared_dir), online_teacher=str(llama_dir), tail="sampled")
