"""Peak memory of one student KD step: the chunked objective against full [N, V] logits.

    .venv/bin/python bench/student_memory.py                          # CPU, V = 151,936, 8 x 512 and 8 x 2,048
    .venv/bin/python bench/student_memory.py --tokens 512 --paths chunked

Each measurement is a fresh process (`--one PATH TOKENS`) that builds a small Llama student (hidden 64,
2 layers, tied head: its weights are ~40 MB, so what is measured is the loss, not the model), random
format-3 cache rows for the targets, and runs one forward + backward of KD (fkl on K + 1 buckets, the
SpecKD topk gate with reject weight 0.5 so every row is kept, IDTS, alpha = 0.1 so CE is in the loss too),
then prints its peak resident memory (`ru_maxrss`). The process's address space is capped (`--cap-gb`,
default 20) so a path that needs more fails with out-of-memory instead of taking the machine down; that is
reported as "> cap".
  chunked   `pipeline.losses.chunked.StudentObjective`, the trainer's path (rows per chunk: auto, ~64 MiB)
  full      logits [N, V] for every target at once, `objective.kd_terms` + cross-entropy, autograd: the
            trainer's path before the chunked loss (kept as the reference in tests/losses/test_chunked_loss.py)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one(path: str, tokens: int, vocab: int, seqs: int, chunk_rows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.losses.adakd import LATF
    from pipeline.training.student import StudentObjective
    from pipeline.losses.objective import kd_terms
    from pipeline.losses.options import KdOptions
    from pipeline.training.student import TargetLogits

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max(4096, tokens),
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    k, g = 8, 4
    ids = torch.randint(vocab, (seqs, tokens))
    att = torch.ones_like(ids)
    tb = torch.arange(seqs).repeat_interleave(tokens - 1)
    tt = torch.arange(1, tokens).repeat(seqs)
    n = tb.numel()
    tgt = ids[tb, tt]
    top = torch.randint(vocab, (n, k))
    lp = torch.log_softmax(torch.randn(n, k + 1) * 2, -1)
    cache = {"topk_ids": top, "topk_logprobs": lp[:, :k], "tail_logprob": lp[:, k],
             "tail_entropy": torch.full((n,), 5.0), "tail_log_partition": torch.randn(n, g) - 3.0}
    grid = torch.tensor([2.0, 1 / 0.7, 1 / 1.4, 0.5])
    s = KdOptions(loss="fkl", gate="topk", gate_k=5, reject_weight=0.5, idts=True)
    t0 = time.perf_counter()
    if path == "chunked":
        obj = StudentObjective(model, s, vocab, grid, LATF(10), torch.Generator().manual_seed(0), chunk_rows)
        loss, plan, _, _ = obj(ids, att, tb, tt, tgt, cache, lambda p: (0.1 / n, 0.9 / max(p.denominator, 1e-9)))
        kept = plan.kept
    else:
        logits = TargetLogits(model)(ids, att, tb, tt)
        ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
        terms = kd_terms(logits, cache, s, vocab, grid, LATF(10), torch.Generator().manual_seed(0))
        loss = 0.1 / n * ce + 0.9 / max(terms.denominator, 1e-9) * terms.numerator
        kept = terms.kept
    loss.backward()
    return {"path": path, "targets": n, "kept": kept, "seconds": time.perf_counter() - t0,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--paths", nargs="+", default=["chunked", "full"])
    ap.add_argument("--chunk-rows", type=int, default=0)
    ap.add_argument("--cap-gb", type=float, default=20.0)
    ap.add_argument("--one", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        cap = int(args.cap_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            print(json.dumps(one(args.one[0], int(args.one[1]), args.vocab, args.seqs, args.chunk_rows)))
        except (MemoryError, RuntimeError) as e:
            if "memory" not in str(e) and not isinstance(e, MemoryError):
                raise
            print(json.dumps({"path": args.one[0], "oom": True}))
        return
    print("| path | targets (seqs x tokens) | V | peak RSS | step (s) | kept |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for path in args.paths:
            proc = subprocess.run([sys.executable, __file__, "--one", path, str(tokens), "--vocab", str(args.vocab),
                                   "--seqs", str(args.seqs), "--chunk-rows", str(args.chunk_rows),
                                   "--cap-gb", str(args.cap_gb)], capture_output=True, text=True)
            try:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                r = {"oom": True} if proc.returncode in (-9, 137) else {"error": proc.stderr[-300:]}
            shape = f"{args.seqs} x {tokens}"
            if r.get("oom"):
                print(f"| {path} | {shape} | {args.vocab:,} | > {args.cap_gb:g} GB (out of memory) | — | — |", flush=True)
            elif "error" in r:
                print(f"| {path} | {shape} | {args.vocab:,} | error: {r['error']} | | |", flush=True)
            else:
                print(f"| {path} | {shape} | {args.vocab:,} | {r['peak_mb'] / 1024:.2f} GB | {r['seconds']:.1f} | "
                      f"{r['kept']}/{r['targets']} |", flush=True)


if __name__ == "__main__":
    main()
