"""How exactly the cache re-tempers a real teacher: A(β) = log Σ_v p_v^β from the cache against float64.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tempering.py            # 3,000 held-out rows, both teachers
    OMP_NUM_THREADS=1 .venv/bin/python bench/tempering.py --model runs/real_llm/teacher   # a real LLM, grids compared

With `--model DIR` (any causal LM directory: bench/real_llm.py writes SmolLM2-135M-Instruct) the rows are the
model's next-token distributions at every 16th position of real text nobody here wrote (this machine's
/usr/share/doc copyright files and the Python standard library's sources), and each temperature grid of
`--grids` is measured through the real codec (`pipeline.teacher.fidelity.measure_interpolation_error`).

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


def real_text_rows(model_dir: str, rows: int, stride: int = 16, seq: int = 256) -> torch.Tensor:
    """log p [rows, V] float64 of `model_dir` at every `stride`-th position of this machine's own text."""
    import glob
    import sysconfig

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(glob.glob("/usr/share/doc/*/copyright")) + sorted(str(p) for p in (stdlib / "json").glob("*.py"))
    out, have = [], 0
    with torch.no_grad():
        for f in files:
            text = Path(f).read_text(errors="ignore")[:4000]
            ids = tok(text, return_tensors="pt").input_ids[:, :seq]
            if ids.shape[1] < 2 * stride:
                continue
            z = model(ids).logits[0, stride // 2::stride].double()
            out.append(torch.log_softmax(z, dim=-1))
            have += len(z)
            if have >= rows:
                break
    return torch.cat(out)[:rows]


def compare_grids(model_dir: str, rows: int, grids: list[tuple[float, ...]]) -> None:
    """Max |A_cache(β) - A_exact(β)| of each grid over the IDTS range and over [0.5, 2], on real-text rows."""
    from pipeline.cache.schema import PRESETS, CodecParams
    from pipeline.teacher.fidelity import measure_interpolation_error

    logp = real_text_rows(model_dir, rows)
    ent = -(logp.exp() * logp).sum(-1)
    print(f"{len(logp)} rows of {model_dir} (V = {logp.shape[1]:,}): mean entropy {float(ent.mean()):.2f} nats, "
          f"median top-8 mass {float(logp.exp().topk(8, -1).values.sum(-1).median()):.3f}")
    print("| grid (T) | max abs(A_cache - A_exact), IDTS range | max, T in [0.5, 2] |")
    print("|---|---:|---:|")
    for g in grids:
        params = CodecParams(vocab_size=logp.shape[1], temperatures=g, **PRESETS["compact"])  # K = 8, as measured
        idts = full = 0.0
        for a in range(0, len(logp), 160):  # 160 rows at a time: the float64 truth is [rows, 16, V]
            part = logp[a:a + 160]
            idts = max(idts, measure_interpolation_error(params, logp=part, n_temperatures=61)["max"])
            full = max(full, measure_interpolation_error(params, logp=part, temp_range=(0.5, 2.0),
                                                         n_temperatures=121)["max"])
        print(f"| {', '.join(f'{t:g}' for t in g)} | {idts:.4f} | {full:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a causal LM directory: measure it on this machine's text instead")
    ap.add_argument("--grids", default="0.5,0.7,1.4,2;0.5,0.7,1.2,1.4,1.65,2",
                    help="with --model: temperature grids to compare, ';'-separated")
    ap.add_argument("--root", default="runs/bench", help="bench/realtext.py's directory (built when missing)")
    ap.add_argument("--rows", type=int, default=3000, help="held-out target rows (whole examples, so a few more)")
    ap.add_argument("--block-tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model:
        grids = [tuple(float(t) for t in g.split(",")) for g in args.grids.split(";")]
        compare_grids(args.model, min(args.rows, 480), grids)
        return

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
