"""How exactly the cache re-tempers a real teacher: A(β) = log Σ_v p_v^β from the cache against float64.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tempering.py            # 3,000 held-out rows, both teachers

The student stage rescales the teacher to temperature T = 1/β through A(β) (docs/methods.md §2): the head's
share from the cached top-K log-probs, the tail's from `tail_log_partition_at` (PCHIP on the cached tail
statistics). This measures max and mean |A_cache(β) − A_exact(β)| over the IDTS range T ∈ [e^-0.5, e^0.5]
(301 temperatures; and over the grid's whole range [0.5, 2]) on the rows of the real-text teachers of bench/realtext.py
(`teacher` and its x2-sharpened copy), each cached through the real `run_teacher` with the default preset
(K = 8); A_exact from the teacher's logits over all V ids in float64. The error includes the head's
quantisation (β times its log-prob error) as well as the tail interpolation: it is the error IDTS sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import realtext  # noqa: E402
from fidelity import kdcache_build, subset_prepared  # noqa: E402


def log_partition_error(cache, ids, masks, model_dir: Path, betas: torch.Tensor, block_tokens: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (max |ΔA| [B], mean |ΔA| [B]) per β in `betas` [B], over every row of `cache`."""
    from pipeline.losses.temperature import tail_log_partition_at

    grid = torch.tensor([1.0 / t for t in cache.temperatures], dtype=torch.float64)
    teacher = realtext._load(model_dir)
    worst = torch.zeros(len(betas), dtype=torch.float64)
    total = torch.zeros(len(betas), dtype=torch.float64)
    row = 0
    for zt in realtext.target_logits(teacher, ids, masks, block_tokens):
        n = len(zt)
        lp64 = torch.log_softmax(zt.double(), dim=-1)  # [n, V]
        r = cache.read(row, row + n, ("topk_logprobs", "tail_logprob", "tail_entropy", "tail_log_partition"))
        head = torch.as_tensor(r["topk_logprobs"]).double()  # [n, K]
        stats = [torch.as_tensor(r[f]).double() for f in ("tail_log_partition", "tail_logprob", "tail_entropy")]
        for i, beta in enumerate(betas.tolist()):
            exact = torch.logsumexp(beta * lp64, dim=-1)  # [n]
            b = torch.full((n,), beta, dtype=torch.float64)
            tail = tail_log_partition_at(b, grid, *stats, cache.params.n_tail)
            err = (torch.logaddexp(torch.logsumexp(beta * head, dim=-1), tail) - exact).abs()
            worst[i] = max(float(worst[i]), float(err.max()))
            total[i] += float(err.sum())
        row += n
    return worst, total / max(row, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/bench", help="bench/realtext.py's directory (built when missing)")
    ap.add_argument("--rows", type=int, default=3000, help="held-out target rows (whole examples, so a few more)")
    ap.add_argument("--block-tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    b = realtext.ensure(args.root, log=log)
    work = Path(args.root) / "fidelity" / f"rows{args.rows}"
    ids, masks, n = subset_prepared(b, args.rows, work / "prepared")
    # The IDTS range (T in [e^-0.5, e^0.5], log-spaced) and the rest of the grid's range, [0.5, 2].
    idts = np.exp(np.linspace(-0.5, 0.5, 301))
    temps = np.unique(np.concatenate([idts, np.exp(np.linspace(np.log(0.5), np.log(2.0), 101))]))
    in_idts = torch.as_tensor((temps >= idts.min() - 1e-12) & (temps <= idts.max() + 1e-12))
    betas = torch.tensor(1.0 / temps, dtype=torch.float64)
    print(f"{n:,} held-out target rows; T in the IDTS range [{idts.min():.3f}, {idts.max():.3f}] (301 values) "
          f"and over the grid's range [0.5, 2] ({len(temps)} values in all)")
    print("| teacher | max abs(A_cache - A_exact), IDTS range | mean | max, T in [0.5, 2] | at T |")
    print("|---|---:|---:|---:|---:|")
    for name, model_dir in (("teacher", b.teacher), ("teacher_sharp", b.teacher_sharp)):
        cache = kdcache_build(work / "prepared", model_dir, work / name / "kdcache_k8", 8)
        worst, mean = log_partition_error(cache, ids, masks, model_dir, betas, args.block_tokens)
        at = int(worst.argmax())
        print(f"| {name} | {float(worst[in_idts].max()):.4f} | {float(mean[in_idts].mean()):.5f} | "
              f"{float(worst.max()):.4f} | {temps[at]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
