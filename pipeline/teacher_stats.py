"""What the teacher pass computes per target position (methods.md §1), from its final hidden states.

Everything is float32 over the full vocabulary, on the model's device, before anything is
truncated. The output head is applied only to the hidden states of target positions and only
`chunk_rows` rows at a time, so peak memory is a few [chunk_rows, V] float32 buffers however
large batch x length x V would be (a 7B Llama at 8k tokens x 32k vocab would need 1 GiB per
logits copy otherwise).

Cost on CPU (bench/teacher.py, 2-core EPYC, one thread): the statistics take ~7 ns per vocabulary
entry (top-K 1.9, two exps 2.1, sqrt 0.6, the rest reductions and Python), the head matmul
2H FLOPs = ~10 ns at H = 256. So a small CPU teacher pays ~40% on top of its forward pass
(teacher / bare forward tokens/s = 0.71 at one thread); at H >= 2048 on a GPU it is a few percent.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class HeadSpec:
    """How to turn final hidden states into the teacher's logits.

    weight: [V_model, H] output embedding; bias: [V_model] or None; vocab_size: ids kept in the
    distribution (the tokenizer's size: rows beyond it are padding the model can never be asked to
    emit, masked to -inf); softcap / scale: Gemma-2-style final logit soft-capping and Cohere-style
    logit scaling, applied as the model's own forward would.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab_size: int
    softcap: float | None = None
    scale: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, H] hidden states -> [C, vocab_size] float32 logits."""
        z = hidden @ self.weight[: self.vocab_size].T
        if self.bias is not None:
            z = z + self.bias[: self.vocab_size]
        z = z.float()
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def head_spec(model, vocab_size: int) -> HeadSpec:
    """The output head of a Hugging Face causal LM, restricted to `vocab_size` ids."""
    from pipeline.errors import KdError

    head = model.get_output_embeddings()
    cfg = model.config
    if head is None or getattr(head, "weight", None) is None:
        raise KdError(f"{type(model).__name__} has no output embedding matrix: cannot cache its distributions")
    if head.weight.shape[0] < vocab_size:
        raise KdError(f"the model's output head has {head.weight.shape[0]} rows but the tokenizer has "
                      f"{vocab_size} ids: the model cannot score every token (wrong tokenizer?)")
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * scale
    if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale = (scale or 1.0) / float(cfg.logits_scaling)
    return HeadSpec(weight=head.weight, bias=getattr(head, "bias", None), vocab_size=vocab_size,
                    softcap=float(softcap) if softcap else None, scale=float(scale) if scale else None)


@torch.no_grad()
def check_head(model, head: HeadSpec, device: torch.device) -> float:
    """Compare `head` applied to the final hidden states with the model's own logits on 8 tokens.

    The teacher pass bypasses `model.forward`'s head to apply it to target rows only; a family whose
    forward transforms logits in a way `head_spec` does not know would be cached wrongly and
    silently. Returns the max abs difference; raises `KdError` when it is not rounding-sized.
    """
    from pipeline.errors import KdError

    n = min(8, head.vocab_size)
    ids = (torch.arange(n, device=device) * 7919 % head.vocab_size)[None]
    ref = model(input_ids=ids).logits[0, :, : head.vocab_size].float()
    ours = head.logits(model.base_model(input_ids=ids).last_hidden_state[0])
    finite = torch.isfinite(ref) & torch.isfinite(ours)
    if not bool(finite.all()):
        return float("nan")  # non-finite logits are reported per example by the caller
    diff = float((ref - ours).abs().max())
    tol = (1e-3 if ref.dtype == torch.float32 and head.weight.dtype == torch.float32 else 5e-2) * (1 + float(ref.abs().max()))
    if diff > tol:
        raise KdError(f"{type(model).__name__}: logits from its output head differ from its forward pass by {diff:.3g} "
                      "(an unsupported logit transform); this model family is not supported by the teacher pass")
    return diff


class NonFiniteLogits(Exception):
    """Raised with the row (within the call) whose logits hold NaN or inf."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


# Rows per block of the statistics on CPU: ~1 MiB of float32 logits, so the block's temporaries
# (shifted logits, their exp, one scratch buffer) stay in L2/L3 instead of streaming from DRAM on
# every pass. Measured on a 2-core EPYC, V=16384, one thread, ns per vocabulary entry: blocks of
# 1024 rows 24-32, 16 rows 7-13. On GPUs a whole chunk is one block (launch overhead dominates there).
CPU_BLOCK_BYTES = 1 << 20


def block_rows_for(vocab_size: int, device: torch.device) -> int:
    """Rows of logits processed together by `distribution_stats` on `device`."""
    if device.type != "cpu":
        return 1 << 30
    return max(1, CPU_BLOCK_BYTES // (4 * vocab_size))


# CPU blocks are spread over a pool of Python threads, each running torch single-threaded, instead of
# letting every op of a block open an OpenMP region over all cores: ~25 ops per 1 MiB block are too
# small to pay for a barrier, and when another process holds a core the barrier waits a scheduler time
# slice. Measured (2-core EPYC shared with other jobs, V=32000, 24k rows): OpenMP per op 304 s,
# one thread 6 s. Each row's result is the same whichever thread computes it (single-threaded kernels).
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != n:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kdcache-stats"), n
    return _POOL


def _single_threaded(fn: Callable[[], Any]) -> Any:
    if torch.get_num_threads() != 1:  # this thread's OpenMP setting (also moves torch's global default)
        torch.set_num_threads(1)
    return fn()


_WORKSPACE = threading.local()


def _buffers(rows: int, v: int, device: torch.device) -> list[torch.Tensor]:
    """Four [rows, V] float32 scratch tensors, kept per thread: allocating ~1 MiB tensors per op makes
    malloc map and unmap pages, and with two threads the unmaps' TLB shootdowns cost more than the
    math (measured: 2 threads 15.9 ns per entry with fresh tensors, 6.6 with reused ones)."""
    key = (v, device)
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None or _WORKSPACE.key != key or bufs[0].shape[0] < rows:
        _WORKSPACE.bufs = bufs = [torch.empty((rows, v), dtype=torch.float32, device=device) for _ in range(4)]
        _WORKSPACE.key = key
    return [b[:rows] for b in bufs]


def _block_stats(z: torch.Tensor, target_ids: torch.Tensor, k: int, beta_list: list[float],
                 order: list[int], out: dict[str, torch.Tensor], rows: slice, reuse: bool) -> None:
    """Statistics of one block of rows (see `distribution_stats`), written into `out[name][rows]`."""
    z = z.float()
    if reuse:
        sh, e, x, y = _buffers(*z.shape, z.device)
    else:
        sh, e, x, y = (torch.empty_like(z) for _ in range(4))
    tz, ti = torch.topk(z, k, dim=-1, sorted=True)
    m = tz[:, :1]
    torch.sub(z, m, out=sh)
    torch.exp(sh, out=e)
    s = e.sum(-1)
    log_s = torch.log(s)
    out["topk_logprobs"][rows] = tz - m - log_s[:, None]
    out["topk_ids"][rows] = ti
    out["entropy"][rows] = log_s - torch.linalg.vecdot(e, sh) / s
    powers = {1.0: e}  # b -> exp(b * sh) of this block
    free = [x, y]
    for g in order:  # ascending b, so b/2 is done before b
        b = beta_list[g]
        half = next((p for p in powers if math.isclose(2 * p, b, rel_tol=1e-12)), None)
        double = next((p for p in powers if math.isclose(p, 2 * b, rel_tol=1e-12)), None)
        if half is not None:  # sum exp(2p sh) = |exp(p sh)|^2: a dot product, no pass of its own
            total = torch.linalg.vecdot(powers[half], powers[half])
        else:
            # sqrt(exp(2b sh)) loses only the terms whose exp(2b sh) underflowed: each < e^-51.5,
            # against a sum >= 1.
            buf = free.pop() if free else torch.empty_like(sh)
            if double is not None:
                torch.sqrt(powers[double], out=buf)
            else:
                torch.exp(torch.mul(sh, b, out=buf), out=buf)
            powers[b] = buf
            total = buf.sum(-1)
        out["log_partition"][rows, g] = torch.log(total) - b * log_s
    out["target_logprobs"][rows] = sh.gather(1, target_ids[:, None]).squeeze(1) - log_s


@torch.no_grad()
def distribution_stats(logits: torch.Tensor, target_ids: torch.Tensor, k: int, betas: torch.Tensor,
                       tail_samples: int = 0, generator: torch.Generator | None = None,
                       block_rows: int | None = None, threads: int | None = None) -> dict[str, torch.Tensor]:
    """Cached quantities of C next-token distributions (methods.md §1), exact over the full vocabulary.

    logits [C, V] float32 (not modified); target_ids [C] int64; betas [G] float32 (1/T for the grid).
    Returns topk_ids [C, K] int64, topk_logprobs [C, K], entropy [C], log_partition [C, G],
    target_logprobs [C] (float32), and with tail_samples = S > 0: tail_ids [C, S] int64 (-1 pads),
    tail_counts [C, S] int64 — S draws from p restricted to ids outside the top-K.
    `threads` (CPU only; default torch's intra-op count) threads share the blocks.

    With m the row maximum, sh = z - m <= 0, e = exp(sh), s = sum e (>= 1, no overflow/underflow):
    log p = sh - log s;  H = log s - sum(e * sh) / s  (two non-negative terms: no cancellation);
    A(b) = log sum exp(b * sh) - b log s  (the sum is >= 1 for any b > 0, so no underflow either).
    One exp per entry gives e; a grid point b costs another exp pass unless it is 1/2 (sqrt(e)) or
    twice a point already done (|exp(b/2 sh)|^2, a dot product): the default grid T = 0.5, 0.7, 1.4, 2
    (b = 2, 1/0.7, 1/1.4, 1/2) needs 2 exps and 1 sqrt per entry in all, against log_softmax + entr +
    one logsumexp per grid point before (3x the passes: 24 -> 9.6 ns per entry on one CPU core).
    A row whose logits hold NaN or +-inf gets a NaN entropy (0 * -inf, inf - inf): `rows_from_hidden`
    checks that instead of scanning the logits again.
    """
    c, v = logits.shape
    dev = logits.device
    blk = block_rows or block_rows_for(v, dev)
    beta_list = [float(b) for b in betas.tolist()]
    order = sorted(range(len(beta_list)), key=lambda g: beta_list[g])
    out = {"topk_ids": torch.empty((c, k), dtype=torch.int64, device=dev),
           "topk_logprobs": torch.empty((c, k), dtype=torch.float32, device=dev),
           "entropy": torch.empty(c, dtype=torch.float32, device=dev),
           "log_partition": torch.empty((c, len(beta_list)), dtype=torch.float32, device=dev),
           "target_logprobs": torch.empty(c, dtype=torch.float32, device=dev)}
    starts = list(range(0, c, blk))

    def blocks(which: list[int]) -> None:
        for a in which:
            _block_stats(logits[a: a + blk], target_ids[a: a + blk], k, beta_list, order, out, slice(a, a + blk),
                         reuse=dev.type == "cpu")

    def tails() -> dict[str, torch.Tensor]:  # sequential in block order: the generator's draws are reproducible
        parts = [sample_tail(logits[a: a + blk].float(), out["topk_ids"][a: a + blk], tail_samples, generator)
                 for a in starts]
        return {n: torch.cat([p[n] for p in parts]) for n in ("tail_ids", "tail_counts")}

    n = threads or torch.get_num_threads()
    if dev.type == "cpu" and n > 1:
        main_threads = torch.get_num_threads()
        pool = _pool(n)
        try:
            for f in [pool.submit(_single_threaded, lambda i=i: blocks(starts[i::n])) for i in range(n)]:
                f.result()
            if tail_samples:
                out.update(pool.submit(_single_threaded, tails).result())
        finally:
            torch.set_num_threads(main_threads)  # the workers' set_num_threads(1) moved the global default
    else:
        blocks(starts)
        if tail_samples:
            out.update(tails())
    return out


def sample_tail(logp: torch.Tensor, top_ids: torch.Tensor, s: int,
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """S draws per row from p restricted to ids outside the top-K, as sorted (id, count) pairs.

    logp [C, V] (log-probabilities up to a per-row constant); top_ids [C, K]. Rows whose tail mass
    is zero (K = V, or underflow) get no draws.
    """
    v = logp.shape[1]
    tail_logp = logp.scatter(1, top_ids, float("-inf"))
    has_tail = torch.isfinite(tail_logp).any(-1)
    probs = torch.softmax(tail_logp.masked_fill(~has_tail[:, None], 0.0), dim=-1)
    draws = torch.multinomial(probs, s, replacement=True, generator=generator)  # [C, S]
    # Count draws per id ([C, V], the size of the logits we already hold); at most S ids are
    # non-zero, so the top-S counts hold all of them. Sorting by id makes the layout canonical.
    counts_full = torch.zeros_like(logp, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    counts, ids = torch.topk(counts_full, s, dim=-1)
    ids = torch.where((counts > 0) & has_tail[:, None], ids, torch.full_like(ids, v))
    ids, order = torch.sort(ids, dim=-1)
    counts = counts.gather(1, order)
    pad = ids == v
    ids = ids.masked_fill(pad, -1)
    counts = counts.masked_fill(pad, 0)
    return {"tail_ids": ids, "tail_counts": counts}


@torch.no_grad()
def rows_from_hidden(hidden: torch.Tensor, target_ids: torch.Tensor, head: HeadSpec, k: int, betas: torch.Tensor,
                     chunk_rows: int, tail_samples: int = 0,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Apply the head to R target hidden states [R, H] in chunks; returns the stats of all R rows.

    Raises `NonFiniteLogits(row)` for the first row whose logits are not all finite.
    """
    parts: list[dict[str, torch.Tensor]] = []
    for a in range(0, hidden.shape[0], chunk_rows):
        z = head.logits(hidden[a: a + chunk_rows])
        part = distribution_stats(z, target_ids[a: a + chunk_rows], k, betas, tail_samples, generator)
        bad = ~torch.isfinite(part["entropy"])  # NaN/inf logits make the entropy NaN (see distribution_stats)
        if bool(bad.any()):
            raise NonFiniteLogits(a + int(bad.nonzero()[0, 0]))
        parts.append(part)
    if not parts:
        raise ValueError("rows_from_hidden needs at least one row")
    if len(parts) == 1:
        return parts[0]
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def auto_chunk_rows(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per head chunk (one matmul, one [rows, V] float32 logits tensor).

    CPU: 64 MiB of logits; the statistics then walk it in cache-sized blocks. GPU: ~2 GiB for the
    logits and the ~4 same-sized temporaries of `distribution_stats`, which runs on the whole chunk
    there (per-chunk kernel launches must stay small next to the forward pass).
    """
    if torch.device(device).type == "cpu":
        rows = (64 << 20) // (4 * vocab_size)
    else:
        rows = (2 << 30) // (20 * vocab_size)
    return max(1, min(4096, rows))
