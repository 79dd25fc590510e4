"""A real-text teacher for the benchmarks, made by kdcache itself: corpus, tokenizer, teacher, student.

    OMP_NUM_THREADS=1 .venv/bin/python bench/realtext.py            # build or reuse everything under runs/bench
    OMP_NUM_THREADS=1 .venv/bin/python bench/realtext.py --probe    # tokens/s of 20 teacher steps, nothing kept
    OMP_NUM_THREADS=1 .venv/bin/python bench/realtext.py --stats    # held-out entropy / top-32 mass only

What it builds (each stage is skipped when its recorded settings hash matches, so a re-run costs
seconds; change a setting and that stage and the ones after it are rebuilt):

    runs/bench/stdlib/          pipeline/data/stdlib_corpus.py output: {train,heldout,text}.jsonl + manifest.json
    runs/bench/tokenizer/       byte-level BPE, V = 16,384, trained on the train split (prompt + response)
    runs/bench/text/train.jsonl the train tiles as {"text": prompt + response} (every token a target)
    runs/bench/prepared/train   `kdcache prepare` of that text (teacher and student training)
    runs/bench/prepared/heldout `kdcache prepare` of the held-out prompt -> response pairs (targets =
                                completion tokens + EOS): the positions every benchmark measures
    runs/bench/models/*.json    transformers LlamaConfig files of teacher and student
    runs/bench/teacher/final    the teacher, trained by `pipeline.training.trainer.train` (plain CE, no cache)
    runs/bench/student/final    a ~10x smaller student trained the same way for a few minutes
    runs/bench/teacher_sharp    the teacher with its output head scaled x2 (logits x 2 = temperature 0.5):
                                a second, more confident teacher
    runs/bench/realtext.json    the settings hash of every stage, timings, sizes and held-out statistics

Why these sizes: the teacher (Llama, hidden 256, 4 layers, tied embeddings: 7.36M parameters of which
4.19M are the 16,384 x 256 embedding) trains at ~1,030 tokens/s on one thread of the 2-core VM
(`--probe`: 1,071), so 1,200 steps of 8 sequences (~1M tokens, a third of the 2.87M-token train text)
take ~15 minutes; the student (hidden 48, 2 layers, 0.84M parameters, 8.8x smaller) ~4.5 minutes
for 600 steps of 16. The train text is used as plain text so every token is a training target;
held-out files never reach the tokenizer or the models.

Measured 2026-11-23 (teacher 951 s, student 274 s; 25,005 held-out target rows, `--stats`):

    model           CE (nats)  mean entropy  median top-32 mass (p10)  mean top-1 p
    teacher         3.662      3.734         0.8135 (0.301)            0.383
    teacher_sharp   4.930      1.280         0.9992 (0.890)            0.653
    student         4.607      4.824         0.6758 (0.283)            0.227

A teacher this small, trained for 15 CPU minutes, is less sure of itself than a production LLM
(mean entropy ~2 nats); the x2 copy is surer (median top-32 mass 0.999 vs ~0.985): the two bracket it.

Why untie for the sharpened teacher: with tied embeddings the head is the input embedding, so scaling
it would also scale every input vector; the copy gets its own head = 2 x embedding instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 16384
TEACHER = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 688,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 512, "tie_word_embeddings": True, "rope_theta": 10000.0}
STUDENT = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 512, "tie_word_embeddings": True, "rope_theta": 10000.0}
DEFAULTS = {
    "corpus": {"max_prompt_lines": 12, "max_line_chars": 200, "heldout_every": 20, "seed": 0},
    "tokenizer": {"vocab_size": VOCAB},
    "prepare": {"max_length": 512},
    "teacher": {"config": TEACHER, "max_steps": 1200, "batch_size": 8, "lr": 3e-3, "warmup": 50,
                "weight_decay": 0.01, "seed": 0},
    "student": {"config": STUDENT, "max_steps": 600, "batch_size": 16, "lr": 1e-2, "warmup": 20,
                "weight_decay": 0.0, "seed": 1},
    "sharpen": {"head_scale": 2.0},
}
# A pipeline check in ~2 minutes (same data, 10-step models): `bench/fidelity.py --smoke`.
SMOKE = {**DEFAULTS, "teacher": {**DEFAULTS["teacher"], "max_steps": 10},
         "student": {**DEFAULTS["student"], "max_steps": 10}}
STAGES = ("corpus", "tokenizer", "prepare", "teacher", "student", "sharpen")


def settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Bench:
    """The directory layout under `root` and the per-stage settings hashes (chained: a stage's hash
    covers its own settings and every earlier stage's, so a change propagates forward)."""

    def __init__(self, root: str | Path, settings: dict[str, Any] | None = None):
        self.root = Path(root)
        self.settings = settings or DEFAULTS
        self.record_path = self.root / "realtext.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {"stages": {}}
        self.hashes, chain = {}, platform_identity()
        for s in STAGES:
            chain = settings_hash([chain, self.settings[s]])
            self.hashes[s] = chain

    # ---- paths --------------------------------------------------------------------------------
    corpus = property(lambda self: self.root / "stdlib")
    tokenizer = property(lambda self: self.root / "tokenizer")
    train_text = property(lambda self: self.root / "text" / "train.jsonl")
    prepared_train = property(lambda self: self.root / "prepared" / "train")
    prepared_heldout = property(lambda self: self.root / "prepared" / "heldout")
    teacher = property(lambda self: self.root / "teacher" / "final")
    student = property(lambda self: self.root / "student" / "final")
    teacher_sharp = property(lambda self: self.root / "teacher_sharp")

    def fresh(self, stage: str) -> bool:
        return self.record["stages"].get(stage, {}).get("hash") == self.hashes[stage]

    def done(self, stage: str, **info: Any) -> None:
        self.record["stages"][stage] = {"hash": self.hashes[stage], **info}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        tmp.replace(self.record_path)


def platform_identity() -> dict[str, str]:
    """What the corpus depends on besides our settings: the Python whose stdlib is the text."""
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__}


def build_corpus(b: Bench) -> None:
    from pipeline.data.stdlib_corpus import CorpusConfig
    from pipeline.data.stdlib_corpus import build_corpus as build_stdlib

    c = b.settings["corpus"]
    m = build_stdlib(CorpusConfig(out=str(b.corpus), max_prompt_lines=c["max_prompt_lines"],
                                  max_line_chars=c["max_line_chars"], heldout_every=c["heldout_every"], seed=c["seed"]))
    # The plain-text view of the train tiles (every token a target) where the later stages read it.
    b.train_text.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(b.corpus / "text.jsonl", b.train_text)
    b.done("corpus", counts=m["counts"], outputs={k: m["outputs"][k] for k in ("train", "heldout")},
           python=m["python_version"])


def build_tokenizer(b: Bench) -> None:
    from pipeline.data.bpe_tokenizer import train_tokenizer

    with open(b.train_text, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, b.tokenizer, vocab_size=b.settings["tokenizer"]["vocab_size"])
    if len(tok) != VOCAB:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, expected {VOCAB} (corpus too small for the merges?)")
    b.done("tokenizer", seconds=round(time.perf_counter() - t0, 1), vocab_size=len(tok))


def build_prepared(b: Bench) -> None:
    from pipeline.data.prepare import PrepareConfig, prepare

    ml = b.settings["prepare"]["max_length"]
    tr = prepare(PrepareConfig(data=str(b.train_text), tokenizer=str(b.tokenizer), out=str(b.prepared_train),
                               max_length=ml, format="text", overwrite=True))
    ho = prepare(PrepareConfig(data=str(b.corpus / "heldout.jsonl"), tokenizer=str(b.tokenizer),
                               out=str(b.prepared_heldout), max_length=ml, format="prompt-response", overwrite=True))
    b.done("prepare", train={k: tr[k] for k in ("examples", "tokens", "targets", "truncated")},
           heldout={k: ho[k] for k in ("examples", "tokens", "targets", "truncated")})


def train_model(b: Bench, which: str, max_steps: int | None = None, out: Path | None = None) -> dict[str, Any]:
    """Train the teacher or the student from scratch with `pipeline.training.trainer.train` (plain CE)."""
    from pipeline.training.trainer import train
    from pipeline.training.config import TrainConfig

    s = b.settings[which]
    cfg_path = b.root / "models" / f"{which}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(s["config"], indent=1) + "\n")
    run_dir = out or (b.root / which)
    cfg = TrainConfig(data=str(b.prepared_train), student_config=str(cfg_path), out=str(run_dir), loss="none",
                      max_steps=max_steps or s["max_steps"], batch_size=s["batch_size"], lr=s["lr"],
                      warmup=s["warmup"], weight_decay=s["weight_decay"], schedule="cosine", seed=s["seed"],
                      device="cpu", overwrite=True)
    return train(cfg)


def build_model(b: Bench, which: str) -> None:
    summary = train_model(b, which)
    params = sum(p.numel() for p in _load(b.teacher if which == "teacher" else b.student).parameters())
    b.done(which, seconds=round(summary["seconds"], 1), tokens_per_s=round(summary["tokens_per_s"], 1),
           steps=summary["steps"], last_loss=round(summary["last"]["loss"], 4), parameters=params)


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def build_sharpened(b: Bench) -> None:
    """Copy the teacher with an untied output head = scale x embedding; check logits scale exactly."""
    scale = b.settings["sharpen"]["head_scale"]
    model = _load(b.teacher)
    emb = model.get_input_embeddings().weight.detach().clone()
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False)
    head.weight = torch.nn.Parameter(emb * scale)
    model.set_output_embeddings(head)
    # transformers re-ties on save/load when the config says so; the flag is off, and the check
    # below reloads from disk so a silent re-tie would fail it.
    shutil.rmtree(b.teacher_sharp, ignore_errors=True)
    model.save_pretrained(b.teacher_sharp)
    for f in b.teacher.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, b.teacher_sharp / f.name)
    x = torch.arange(1, 65)[None]
    with torch.no_grad():
        want = _load(b.teacher)(input_ids=x).logits * scale
        got = _load(b.teacher_sharp)(input_ids=x).logits
    err = float((got - want).abs().max())
    if err > 1e-4 * float(want.abs().max()):
        raise SystemExit(f"sharpened teacher's logits are not {scale} x the teacher's (max error {err})")
    b.done("sharpen", head_scale=scale, max_logit_error=err)


# ---- shared with the fidelity bench: target rows, dense teacher logits ------------------------------

def heldout_subset(b: Bench, rows: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The first held-out examples holding at least `rows` target rows (whole examples).

    -> input_ids list [L_e] int64, loss_mask list [L_e] int8, number of target rows they hold.
    """
    from pipeline.data.prepare import load_prepared

    ds = load_prepared(b.prepared_heldout).with_format("numpy")
    ids, masks, n = [], [], 0
    for e in range(len(ds)):
        r = ds[e]
        ids.append(np.asarray(r["input_ids"], dtype=np.int64))
        masks.append(np.asarray(r["loss_mask"], dtype=np.int8))
        n += int(masks[-1].sum())
        if n >= rows:
            break
    return ids, masks, n


@torch.no_grad()
def target_logits(model: Any, ids: list[np.ndarray], masks: list[np.ndarray], batch_tokens: int = 4096):
    """Teacher/student logits at every target row, in row order (example order, then position).

    Row of target position t of an example = the head applied to the hidden state at t - 1 (the
    prediction of token t), as in the cache. Yields float32 blocks [n_block, V], one per batch of
    whole examples, so a caller can stream rows without holding [rows, V].
    """
    from pipeline.models import model_vocab_size
    from pipeline.head import head_spec

    head = head_spec(model, model_vocab_size(model))
    order = list(range(len(ids)))
    i = 0
    while i < len(order):
        j, longest = i + 1, len(ids[i])  # whole examples, padded tokens <= batch_tokens (at least one)
        while j < len(order) and max(longest, len(ids[j])) * (j - i + 1) <= batch_tokens:
            longest = max(longest, len(ids[j]))
            j += 1
        x = torch.zeros(j - i, longest, dtype=torch.long)
        att = torch.zeros(j - i, longest, dtype=torch.long)
        for k in range(i, j):
            x[k - i, : len(ids[k])] = torch.as_tensor(ids[k])
            att[k - i, : len(ids[k])] = 1
        hidden = model.base_model(input_ids=x, attention_mask=att).last_hidden_state
        bb, tt = [], []
        for k in range(i, j):
            t = np.nonzero(masks[k])[0]
            bb += [k - i] * len(t)
            tt += (t - 1).tolist()
        yield head.logits(hidden[torch.as_tensor(bb), torch.as_tensor(tt)]).float()
        i = j


def heldout_stats(model_dir: Path, ids: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Mean entropy, median / p10 top-32 mass, top-1 mass and CE (nats) on the held-out target rows."""
    model = _load(model_dir)
    ent, m32, top1, ce = [], [], [], []
    tgt = np.concatenate([ids_e[m.astype(bool)] for ids_e, m in zip(ids, masks)])
    row = 0
    for z in target_logits(model, ids, masks):
        lp = torch.log_softmax(z.double(), dim=-1)
        p = lp.exp()
        ent.append(-(p * lp).sum(-1))
        top = p.topk(32, dim=-1).values
        m32.append(top.sum(-1))
        top1.append(top[:, 0])
        t = torch.as_tensor(tgt[row : row + len(z)])
        ce.append(-lp.gather(1, t[:, None]).squeeze(1))
        row += len(z)
    ent, m32, top1, ce = (torch.cat(v).numpy() for v in (ent, m32, top1, ce))
    return {"rows": int(len(ent)), "mean_entropy": float(ent.mean()), "median_entropy": float(np.median(ent)),
            "median_top32_mass": float(np.median(m32)), "p10_top32_mass": float(np.quantile(m32, 0.1)),
            "mean_top1": float(top1.mean()), "ce": float(ce.mean())}


def ensure(root: str | Path = "runs/bench", log: Any = print, smoke: bool = False) -> Bench:
    """Build whatever is stale under `root`; return the `Bench` (paths + record)."""
    b = Bench(root, SMOKE if smoke else DEFAULTS)
    steps = [("corpus", build_corpus), ("tokenizer", build_tokenizer), ("prepare", build_prepared),
             ("teacher", lambda b: build_model(b, "teacher")), ("student", lambda b: build_model(b, "student")),
             ("sharpen", build_sharpened)]
    for name, fn in steps:
        if b.fresh(name):
            continue
        log(f"realtext: building {name} ...")
        t0 = time.perf_counter()
        fn(b)
        log(f"realtext: {name} done in {time.perf_counter() - t0:.0f}s")
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/bench")
    ap.add_argument("--probe", action="store_true", help="time 20 teacher steps (after corpus/tokenizer/prepare)")
    ap.add_argument("--stats", action="store_true", help="only (re)compute held-out statistics")
    ap.add_argument("--stats-rows", type=int, default=25000)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if a.probe:
        b = Bench(a.root)
        for name, fn in (("corpus", build_corpus), ("tokenizer", build_tokenizer), ("prepare", build_prepared)):
            if not b.fresh(name):
                fn(b)
        for which in ("teacher", "student"):
            s = train_model(b, which, max_steps=20, out=b.root / f"probe_{which}")
            shutil.rmtree(b.root / f"probe_{which}", ignore_errors=True)
            print(f"probe {which}: {s['tokens_per_s']:,.0f} tokens/s, {s['seconds'] / 20:.2f} s/step, "
                  f"loss {s['last']['loss']:.3f} after 20 steps")
        return
    b = ensure(a.root) if not a.stats else Bench(a.root)
    ids, masks, n = heldout_subset(b, a.stats_rows)
    stats = {}
    for name, path in (("teacher", b.teacher), ("teacher_sharp", b.teacher_sharp), ("student", b.student)):
        stats[name] = heldout_stats(path, ids, masks)
        s = stats[name]
        print(f"{name:14s} rows {s['rows']:,}  CE {s['ce']:.3f}  mean entropy {s['mean_entropy']:.3f}  "
              f"median top-32 mass {s['median_top32_mass']:.4f} (p10 {s['p10_top32_mass']:.3f})  "
              f"mean top-1 {s['mean_top1']:.3f}")
    b.record["heldout_stats"] = stats
    b.record_path.write_text(json.dumps(b.record, indent=1) + "\n")


if __name__ == "__main__":
    main()
