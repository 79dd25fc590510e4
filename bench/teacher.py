"""Teacher-stage throughput against a bare forward pass of the same model, and cache bytes per row.

    .venv/bin/python bench/teacher.py                                  # CPU, < 2 min: Llama h256 x4, V=16384
    .venv/bin/python bench/teacher.py --train-steps 300 --vocab 32000 --hidden 128 --layers 2 --rows 24000
                                                                       # bytes/row on a trained (peaked) teacher
    python bench/teacher.py --device cuda --dtype bfloat16 --preset 1b  # GPU: ~1.1B Llama, reports MFU

What is compared: `run_teacher` (batching, forward, head + full-vocabulary statistics on target
positions, encoding, compression, commit) against `model(input_ids).logits` on the very same
token-budget batches, with the model already loaded in both. The ratio teacher / bare tokens/s is
the cost of caching on top of the forward pass that any teacher pass pays (goal >= 0.9).

The data is synthetic token ids (no tokenizer needed): a sparse Markov chain over a Zipf-popular
vocabulary (low ids frequent, as in BPE vocabularies), so that a teacher trained on it for a few
hundred steps (`--train-steps`) has peaked, realistic next-token distributions: random-init
teachers are near-uniform, which is the worst case for log-prob compression and the best for
nothing. Without training, the head weights are scaled by `--head-scale` (default 8) instead.

Output: a markdown table row (header with --header) and, with --json, the raw numbers.

Current measurements (format 3) are in docs/benchmarks.md. The table and byte counts below were
measured on format 2 (2-core EPYC VM shared with other jobs, so +-10%; `--repeats 3`):

| device | model (h x layers, V) | K | rows | bare tok/s | teacher tok/s | ratio | bytes/row (budget) | teacher |
|---|---|---|---|---|---|---|---|---|
| cpu float32 x1 | h256 x 4, V=16384 | 32 | 6120 | 2,750 | 1,959 | 0.712 | 79.3 (112) | random init, head x8 |
| cpu float32 x2 | h256 x 4, V=16384 | 32 | 6120 | 5,086 | 3,096 | 0.609 | 79.3 (112) | random init, head x8 |
| cpu float32 x2 | h256 x 4, V=16384 (before) | 32 | 6120 | 5,600 | 1,208 | 0.216 | 79.3 (112) | random init, head x8 |

"before" is the statistics code this replaced (log_softmax + entr + one logsumexp per grid point on
1024-row chunks). What is left on CPU is the statistics themselves, ~7 ns per vocabulary entry
(top-K 1.9, two exps 2.1, sqrt 0.6, reductions), against 2H FLOPs per entry for the head: at
H = 256 that is ~40% of the forward pass; at H >= 2048 on a GPU a few percent. Bytes per row on a
teacher trained 300 steps (`--train-steps 300 --vocab 32000 --hidden 128 --layers 2 --heads 4
--kv-heads 4 --intermediate 256 --rows 24000`, loss 3.93, mean entropy 4.0 nats): 59.0 (budget 112).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.batching import token_budget_batches  # noqa: E402
from pipeline.data.prepare import META_FILENAME, write_prepared  # noqa: E402

PRESETS = {  # Llama-shaped configurations
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=16384),
    "1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),  # TinyLlama-1.1B shape
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def synthetic_tokens(n_seq: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[n_seq, seq_len] ids from a Markov chain: each id has 64 successors drawn Zipf-popular, with
    Zipf(1.1) weights over them; 10% of steps jump to a Zipf-popular id (keeps every row uncertain)."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, vocab + 1) ** 1.1
    pop /= pop.sum()
    succ = rng.choice(vocab, size=(vocab, 64), p=pop)
    w = 1.0 / np.arange(1, 65) ** 1.1
    w /= w.sum()
    out = np.empty((n_seq, seq_len), np.int64)
    out[:, 0] = rng.choice(vocab, size=n_seq, p=pop)
    for t in range(1, seq_len):
        nxt = succ[out[:, t - 1], rng.choice(64, size=n_seq, p=w)]
        jump = rng.random(n_seq) < 0.1
        out[:, t] = np.where(jump, rng.choice(vocab, size=n_seq, p=pop), nxt)
    return out


def build_model(args, out: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq_len),
                      tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    return model


def train(model, tokens: np.ndarray, steps: int, device: torch.device, batch: int = 8, crop: int = 128,
          lr: float = 3e-3) -> float:
    """A few hundred AdamW steps on `crop`-token windows of the synthetic chain; returns the last loss."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(1)
    loss = float("nan")
    for step in range(steps):
        idx = rng.integers(0, len(tokens), batch)
        x = torch.as_tensor(tokens[idx, :crop], device=device)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss:.3f}", file=sys.stderr)
    model.eval()
    return loss


def count_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x (matmul parameters incl. the head) + attention scores/values."""
    h, l, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    return 2.0 * (l * per_layer + h * v) + 2.0 * 2 * l * seq_len * h / 2  # causal: half the L x L scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--preset-codec", default="compact", help="the cache's codec preset (compact: K = 8, no draws, "
                                                             "as the documented figures were measured)")
    ap.add_argument("--tail-samples", type=int, default=-1, help="tail draws per row (-1: the codec preset's)")
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--rows", type=int, default=6000, help="target rows (tokens - 1 per sequence)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--head-scale", type=float, default=8.0, help="used when --train-steps is 0")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each side; the best is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="keep the model/data/cache here (default: a temp dir)")
    ap.add_argument("--header", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.cache import open_cache
    from pipeline.models import pick_device
    from pipeline.teacher.runner import TeacherConfig, run_teacher
    from pipeline.teacher.worker import get_model

    device = pick_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kdbench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_seq = -(-args.rows // (args.seq_len - 1))
    tokens = synthetic_tokens(max(n_seq, 512 if args.train_steps else n_seq), args.seq_len, args.vocab, args.seed)
    model = build_model(args, work / "model")
    how = f"trained {args.train_steps} steps"
    if args.train_steps:
        loss = train(model, tokens, args.train_steps, device)
        how += f" (loss {loss:.2f})"
    else:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(args.head_scale)
        how = f"random init, head x{args.head_scale:g}"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model.to(dtype).save_pretrained(work / "model")
    del model
    eval_tokens = tokens[-n_seq:]
    ident = {"name": "synthetic", "vocab_size": args.vocab, "vocab_sha256": f"synthetic-{args.vocab}"}
    ids = [row.tolist() for row in eval_tokens]
    masks = [[0] + [1] * (args.seq_len - 1) for _ in ids]
    meta = {"kind": "kdcache-prepared", "format": "text", "data": "synthetic", "tokenizer": ident,
            "fingerprint": f"synthetic-{args.seed}-{n_seq}-{args.seq_len}-{args.vocab}", "examples": n_seq,
            "tokens": n_seq * args.seq_len, "targets": n_seq * (args.seq_len - 1), "truncated": 0,
            "max_length": args.seq_len}
    write_prepared(work / "prepared", ids, masks, meta)
    assert (work / "prepared" / META_FILENAME).is_file()
    print(f"setup {time.perf_counter() - t0:.1f}s ({how})", file=sys.stderr)

    cfg = TeacherConfig(data=str(work / "prepared"), model=str(work / "model"), out=str(work / "cache"),
                        top_k=args.top_k, batch_tokens=args.batch_tokens, device=args.device, dtype=args.dtype,
                        preset=args.preset_codec, tail_samples=args.tail_samples, overwrite=True)
    model, dev, _ = get_model(cfg.model, cfg.device, cfg.dtype)  # loaded once; run_teacher reuses it
    batches = token_budget_batches([args.seq_len] * n_seq, args.batch_tokens)
    n_tokens = n_seq * args.seq_len

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare() -> float:
        sync()
        t = time.perf_counter()
        for b in batches:
            x = torch.as_tensor(eval_tokens[b], device=dev)
            model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        sync()
        return time.perf_counter() - t

    def teacher() -> tuple[float, int]:
        shutil.rmtree(cfg.out, ignore_errors=True)
        sync()
        t = time.perf_counter()
        run_teacher(cfg)
        sync()
        return time.perf_counter() - t

    bare()  # warm-up (allocator, kernels)
    t_bare, t_teacher = [], []
    for _ in range(args.repeats):
        t_bare.append(bare())
        t_teacher.append(teacher())
    c = open_cache(cfg.out)
    nbytes = c.bytes_on_disk()
    tps_bare, tps_teacher = n_tokens / min(t_bare), n_tokens / min(t_teacher)
    row = {"device": str(dev), "dtype": args.dtype, "hidden": args.hidden, "layers": args.layers,
           "vocab": args.vocab, "k": args.top_k, "tokens": n_tokens, "rows": c.num_rows,
           "bare_tok_s": tps_bare, "teacher_tok_s": tps_teacher, "ratio": tps_teacher / tps_bare,
           "bytes_per_row": nbytes / c.num_rows, "budget": 3 * args.top_k + 16, "teacher_made": how,
           "threads": torch.get_num_threads()}
    mfu = ""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        fpt = count_flops_per_token(model.config, args.seq_len)
        if peak:
            row["mfu_teacher"] = tps_teacher * fpt / (peak * 1e12)
            row["mfu_bare"] = tps_bare * fpt / (peak * 1e12)
            mfu = f" {row['mfu_teacher']:.1%} / {row['mfu_bare']:.1%} |"
    if args.header:
        print("| device | model (h x layers, V) | K | rows | bare tok/s | teacher tok/s | ratio | bytes/row (budget) "
              "| teacher |" + (" MFU teacher / bare |" if mfu else ""))
        print("|---|---|---|---|---|---|---|---|---|" + ("---|" if mfu else ""))
    print(f"| {row['device']} {args.dtype} x{row['threads']} | h{args.hidden} x {args.layers}, V={args.vocab} | "
          f"{args.top_k} | {c.num_rows} | {tps_bare:,.0f} | {tps_teacher:,.0f} | {row['ratio']:.3f} | "
          f"{row['bytes_per_row']:.1f} ({row['budget']}) | {how} |{mfu}")
    if args.json:
        print(json.dumps(row))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
