"""Every model family users distil (tests/families.py), as teacher and as student, against float64 oracles
computed from the model's own forward `logits`, never from `pipeline.head.head_spec`.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/teacher/test_families.py -q

Teacher: the real teacher pass (`run_teacher`) over a few prepared examples; every cached quantity (top-K ids
and log-probs, the tail mass, the entropy, the log-partition at the grid temperatures, the target log-probs,
the tail draws) against float64 statistics of `model.double()(input_ids).logits` restricted to the tokenizer's
ids, each example alone, within the codec tolerances of tests/cache/test_cache_oracle.py.
Student: one chunked KD step (`StudentObjective`: the student's hidden states at the targets, its own head,
the cached teacher rows; CE + forward KL at T = 2) against float64 autograd through the student's own
`logits` with tests/losses/reference.py's loss: the value and the gradient of every parameter.
A model whose forward transforms its logits in a way `head_spec` does not know is refused with one line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import layout, open_cache
from pipeline.cache.rows import target_positions
from pipeline.data.batching import pad_right
from pipeline.data.prepare import PrepareConfig, load_prepared, prepare
from pipeline.losses.objective import KD_FIELDS
from pipeline.losses.options import KdOptions
from pipeline.teacher.runner import TeacherConfig, run_teacher
from pipeline.training.student import StudentObjective
from stages.cli import main
from tests.cache.test_cache_oracle import (
    TEMPS,
    K,
    check_a_at_one,
    check_against_reference,
)
from tests.families import FAMILIES, float64_copy
from tests.losses import reference as R

pytestmark = pytest.mark.usefixtures("torch_one_thread")

S = 4  # tail draws per row
EXAMPLES = 6  # prepared examples (~60 target rows)
T_KD, CE_SCALE, KD_SCALE = 2.0, 0.3, 0.7  # the student step: ce_scale·Σ CE + kd_scale·Σ T²·KL at T = 2


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory, data_file, tokenizer_dir):
    out = tmp_path_factory.mktemp("families") / "prepared"
    prepare(PrepareConfig(data=str(data_file), tokenizer=str(tokenizer_dir), out=str(out), max_length=64,
                          max_examples=EXAMPLES))
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, small_prepared, vocab_size):
    """family -> (model directory, cache): each family's teacher saved and cached once, on first use."""
    made = {}

    def get(name: str):
        if name not in made:
            d = tmp_path_factory.mktemp(name)
            model_dir = FAMILIES[name].save(vocab_size, d / "model")
            run_teacher(TeacherConfig(data=str(small_prepared), model=str(model_dir), out=str(d / "cache"), top_k=K,
                                      temperatures=TEMPS, tail_samples=S, shard_rows=10_000, batch_tokens=256,
                                      device="cpu", dtype="float32", threads=1))
            made[name] = (model_dir, open_cache(d / "cache"))
        return made[name]

    return get


def examples(prepared) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, target positions) of every example with a target, in dataset order (the cache's row order)."""
    ds = load_prepared(prepared)
    out = [(np.asarray(ids), target_positions(m)) for ids, m in zip(ds["input_ids"], ds["loss_mask"])]
    return [(ids, t) for ids, t in out if len(t)]


@torch.no_grad()
def oracle_logits(model, prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 logits [N, V_model] of every target row from the model's own forward, each example alone and
    unpadded, in float64; the target ids [N])."""
    m64 = float64_copy(model)
    rows, tgts = [], []
    for ids, t in examples(prepared):
        z = m64(input_ids=torch.from_numpy(ids)[None]).logits[0]
        rows.append(z[torch.from_numpy(t - 1)])
        tgts.append(torch.from_numpy(ids[t]))
    return torch.cat(rows), torch.cat(tgts)


def statistics(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> dict[str, np.ndarray]:
    """methods.md §1 in float64 from logits [N, >= vocab] over the tokenizer's ids (the padding is no token)."""
    logp = torch.log_softmax(logits[:, :vocab].double(), dim=-1)
    srt, order = logp.sort(-1, descending=True)
    rest = srt[:, K:]
    betas = torch.tensor([1.0 / t for t in TEMPS], dtype=torch.float64)
    return {"logp": logp.numpy(), "topk_ids": order[:, :K].numpy(), "topk_logprobs": srt[:, :K].numpy(),
            "tail_logprob": torch.logsumexp(rest, -1).numpy(), "entropy": (-(logp.exp() * logp).sum(-1)).numpy(),
            "log_partition": torch.logsumexp(betas[None, :, None] * logp[:, None, :], -1).numpy(),
            "target_ids": targets.numpy(), "target_logprobs": logp.gather(1, targets[:, None]).squeeze(1).numpy()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_cache_matches_the_models_own_logits(family, teachers, small_prepared, vocab_size):
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[family]
    model_dir, c = teachers(family)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == model.config.architectures[0]
    logits, targets = oracle_logits(model, small_prepared)
    assert logits.shape[1] == fam.model_vocab(vocab_size)
    ref = statistics(logits, targets, vocab_size)
    check_against_reference(c, ref)
    check_a_at_one(c, ref)
    assert c.vocab_size == vocab_size
    assert c.meta["masked_model_ids"] == fam.model_vocab(vocab_size) - vocab_size
    assert c.meta["teacher"]["model_vocab_size"] == fam.model_vocab(vocab_size)
    # the tail draws: outside the top-K, ids the tokenizer has, S per row
    rows = c.read(0, c.num_rows)
    for r in range(c.num_rows):
        real = rows["tail_ids"][r][rows["tail_ids"][r] >= 0]
        assert not set(real.tolist()) & set(rows["topk_ids"][r].tolist()) and real.max(initial=0) < vocab_size
    assert np.all(rows["tail_counts"].sum(1) == S)
    # informative rows (not near-uniform), and the family's own head transform matters on them: the plain product
    # hidden·Wᵀ (+ b) would be off by far more than the tolerance just checked.
    assert ref["entropy"].mean() < 0.75 * math.log(vocab_size)
    if fam.transform != "none":
        plain = plain_product_logits(model, small_prepared, vocab_size)
        gap = np.abs(torch.log_softmax(plain, -1).numpy() - ref["logp"]).max()
        assert gap > 100 * (c.params.head_step + c.params.tail_step), gap


@torch.no_grad()
def plain_product_logits(model, prepared, vocab: int) -> torch.Tensor:
    """hidden·Wᵀ + b over the tokenizer's ids, without the family's transform: what a cache would hold that
    ignored it."""
    m64 = float64_copy(model)
    head = m64.get_output_embeddings()
    rows = []
    for ids, t in examples(prepared):
        h = m64.base_model(input_ids=torch.from_numpy(ids)[None]).last_hidden_state[0, torch.from_numpy(t - 1)]
        z = h @ head.weight[:vocab].T
        rows.append(z + head.bias[:vocab] if getattr(head, "bias", None) is not None else z)
    return torch.cat(rows)


def cache_tensors(c) -> dict[str, torch.Tensor]:
    """Every row of the cache as the trainer hands them to the loss (decoded `KD_FIELDS`, torch)."""
    rows = c.read(0, c.num_rows, fields=KD_FIELDS)
    return {f: torch.from_numpy(np.asarray(rows[f])) for f in KD_FIELDS if f in rows}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_student_chunked_step_matches_float64_autograd(family, teachers, small_prepared, vocab_size):
    fam = FAMILIES[family]
    _, c = teachers(family)
    student = fam.build(vocab_size, seed=1)  # another init of the family: a student that disagrees with its teacher
    s64 = float64_copy(student)  # before any backward: a copy holds no gradient
    # the library's step: a right-padded batch, hidden states at the targets, the chunked loss over the head
    ex = examples(small_prepared)
    ids, att = (torch.from_numpy(a) for a in pad_right([e for e, _ in ex]))
    tgt_b = torch.cat([torch.full((len(t),), b) for b, (_, t) in enumerate(ex)])
    tgt_t = torch.from_numpy(np.concatenate([t for _, t in ex]))
    target_ids = ids[tgt_b, tgt_t]
    cache = cache_tensors(c)
    assert torch.equal(target_ids, torch.from_numpy(c.read(0, c.num_rows)["target_ids"]))
    grid = torch.tensor([1.0 / t for t in c.temperatures], dtype=torch.float32)
    s = KdOptions(loss="fkl", temperature=T_KD)
    objective = StudentObjective(student, s, c.vocab_size, grid, None, None, chunk_rows=7)
    loss, plan, _, _ = objective(ids, att, tgt_b, tgt_t, target_ids, cache, scales=lambda _: (CE_SCALE, KD_SCALE))
    assert plan.keep.all()
    loss.backward()
    got = {n: p.grad for n, p in student.named_parameters()}

    # float64 autograd through the student's own forward logits (each example alone), reference.py's loss
    logits = torch.cat([s64(input_ids=torch.from_numpy(e)[None]).logits[0, torch.from_numpy(t - 1)] for e, t in ex])
    assert logits.shape[1] == fam.model_vocab(vocab_size)  # CE over every row of the head, padding included
    fields = {f: (x if x.dtype == torch.int64 else x.double()) for f, x in cache.items()}
    fields["betas"] = grid.double()
    ce = -torch.log_softmax(logits, -1).gather(1, target_ids[:, None]).sum()
    r_plan = R.plan(logits.detach(), fields, c.vocab_size, t_base=T_KD)
    kd, _, _ = R.kd_sums("fkl", logits, r_plan, R.fields_teacher(fields, c.vocab_size), fields["topk_ids"],
                         c.vocab_size)
    want = CE_SCALE * ce + KD_SCALE * kd
    want.backward()
    assert kd.item() > 0.02 * ce.item()  # the KD term is not negligible next to CE
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-6)
    ref = dict(s64.named_parameters())
    assert got.keys() == ref.keys()
    worst = {}
    for n, g in got.items():
        r = ref[n].grad
        assert g is not None and r is not None and r.dtype == torch.float64, n
        scale = float(r.abs().max())
        assert scale > 0, n
        worst[n] = float((g.double() - r).abs().max()) / scale
    name = max(worst, key=worst.get)
    assert worst[name] < 1e-5, (name, worst[name])  # measured <= 1e-6: float32 vs float64 rounding


# ---- refusal: a head head_spec cannot reproduce is never cached ---------------------------------------------------

def _doubled_llama_dir(out, vocab_size):
    """A registered model type whose forward doubles the logits its head computes (a transform head_spec cannot
    know: nothing in its config says so)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    class DoubledLlamaConfig(LlamaConfig):
        model_type = "kdcache_test_doubled_llama"

    class DoubledLlamaForCausalLM(LlamaForCausalLM):
        config_class = DoubledLlamaConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    AutoConfig.register(DoubledLlamaConfig.model_type, DoubledLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(DoubledLlamaConfig, DoubledLlamaForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    cfg = DoubledLlamaConfig(vocab_size=vocab_size, **FAMILIES["llama"].settings)
    m = DoubledLlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(32.0)
    m.save_pretrained(out)
    return out


def _llama_with(**attr):
    """A plain Llama whose config carries an attribute of another family's head: its forward ignores it, head_spec
    would apply it."""
    def make(out, vocab_size):
        import dataclasses

        fam = FAMILIES["llama"]
        return dataclasses.replace(fam, settings={**fam.settings, **attr}).save(vocab_size, out)
    return make


@pytest.mark.parametrize("make", [_doubled_llama_dir, _llama_with(final_logit_softcapping=8.0),
                                  _llama_with(logit_scale=0.25), _llama_with(logits_scaling=4.0)],
                         ids=["forward-doubles-logits", "llama+softcap-attr", "llama+logit_scale-attr",
                              "llama+logits_scaling-attr"])
def test_unknown_head_transform_is_refused_with_one_line(make, tmp_path, small_prepared, vocab_size):
    model_dir = make(tmp_path / "model", vocab_size)
    res = CliRunner().invoke(main, ["teacher", "--data", str(small_prepared), "--model", str(model_dir),
                                    "--out", str(tmp_path / "cache"), "--device", "cpu", "--dtype", "float32",
                                    "--threads", "1"])
    assert res.exit_code == 1, res.output
    errs = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errs) == 1 and "differ from its forward pass" in errs[0] and "not supported" in errs[0], res.output
    assert "Traceback" not in res.output
    # planned at most: no shard committed, so no reader ever sees a row of this teacher
    cache = tmp_path / "cache"
    assert not list(cache.glob(f"{layout.SHARDS_DIR}/*/{layout.COMMIT_FILENAME}"))
    if (cache / layout.META_FILENAME).is_file():
        c = open_cache(cache)
        assert c.committed() and not any(c.committed()) and not c.complete


@pytest.mark.parametrize("make", [_doubled_llama_dir, _llama_with(logit_scale=0.25)],
                         ids=["forward-doubles-logits", "llama+logit_scale-attr"])
def test_unknown_head_transform_is_refused_as_a_student(make, tmp_path, llama_cache, vocab_size):
    """The student's chunked loss applies head_spec, never the model's forward: the same refusal as the teacher's."""
    model_dir = make(tmp_path / "model", vocab_size)
    res = CliRunner().invoke(main, ["train", "--cache", str(llama_cache), "--student", str(model_dir),
                                    "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu",
                                    "--dtype", "float32"])
    assert res.exit_code == 1, res.output
    errs = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errs) == 1 and "differ from its forward pass" in errs[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "run" / "final").exists()
