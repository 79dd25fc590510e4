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
from typing import Any, Callable

import torch

from pipeline.head import HeadSpec


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


# Head entries are removed from the tail's sums by this value rather than -inf: exp() gives 0 either
# way, but 0 * -inf is NaN in the entropy's dot product and 0 * -1e30 is 0.
_OUT = -1.0e30


def _block_stats(z: torch.Tensor, target_ids: torch.Tensor, k: int, beta_list: list[float],
                 order: list[int], out: dict[str, torch.Tensor], rows: slice, reuse: bool,
                 uniforms: torch.Tensor | None = None) -> None:
    """Statistics of one block of rows (see `distribution_stats`), written into `out[name][rows]`; with
    `uniforms` [c, S] float64, the block's tail draws too (`draw_tail`, from the tail exps computed here)."""
    z = z.float()
    c, v = z.shape
    if reuse:
        sh, e, x, y = _buffers(c, v, z.device)
    else:
        sh, e, x, y = (torch.empty_like(z) for _ in range(4))
    kk = min(k + 1, v)  # the (K+1)-th logit is the tail's maximum: the shift that keeps the tail exact
    tz, ti = torch.topk(z, kk, dim=-1, sorted=True)
    m = tz[:, :1]
    head_sh = tz[:, :k] - m  # [c, K], <= 0
    log_head = torch.log(head_sh.exp().sum(-1))  # log sum_K exp(z - m) >= 0
    tgt_sh = z.gather(1, target_ids[:, None]).squeeze(1) - m[:, 0]
    g = len(beta_list)
    if kk > k:
        z_t = tz[:, k:]  # [c, 1] the tail's largest logit
        has_tail = torch.isfinite(z_t)
        shift = torch.where(has_tail, z_t, m)
        torch.sub(z, shift, out=sh)  # tail entries <= 0, the tail maximum exactly 0
        sh.clamp_(min=_OUT)  # a -inf logit (probability 0) must not reach the dot products as -inf
        sh.scatter_(1, ti[:, :k], _OUT)
        torch.exp(sh, out=e)
        s_t = e.sum(-1)  # >= 1: the tail's own maximum contributes exp(0)
        log_s_t = torch.log(s_t)
        log_tail = (shift - m)[:, 0] + log_s_t  # log sum_tail exp(z - m)
        log_s = torch.logaddexp(log_head, log_tail)
        # log r = -log(1 + head/tail), not log_tail - log_s: on a flat row both are ~log V and their float32
        # difference is off by ~1e-6 absolute, which is 1e-2 of the head mass 1 - r at V = 151,936.
        tail_lp = torch.where(has_tail[:, 0], -torch.logaddexp(log_head - log_tail, torch.zeros_like(log_s)),
                              torch.full_like(log_s, -math.inf))
        # H(pi) = log s_t - sum pi * sh: two non-negative terms, no cancellation.
        ent = log_s_t - torch.linalg.vecdot(e, sh) / s_t
        out["tail_entropy"][rows] = torch.where(has_tail[:, 0], ent, torch.zeros_like(ent))
        if uniforms is not None:
            draws = draw_tail(e, sh, log_s_t, uniforms)
            for name, drawn in draws.items():
                out[name][rows] = drawn
        powers = {1.0: e}  # b -> exp(b * sh) of this block
        free = [x, y]
        for gi in order:  # ascending b, so b/2 is done before b
            b = beta_list[gi]
            half = next((p for p in powers if math.isclose(2 * p, b, rel_tol=1e-12)), None)
            double = next((p for p in powers if math.isclose(p, 2 * b, rel_tol=1e-12)), None)
            if half is not None:  # sum exp(2p sh) = |exp(p sh)|^2: a dot product, no pass of its own
                total = torch.linalg.vecdot(powers[half], powers[half])
            else:
                # sqrt(exp(2b sh)) loses only terms whose exp(2b sh) underflowed: each < e^-51.5 against a sum >= 1.
                buf = free.pop() if free else torch.empty_like(sh)
                if double is not None:
                    torch.sqrt(powers[double], out=buf)
                else:
                    torch.exp(torch.mul(sh, b, out=buf), out=buf)
                powers[b] = buf
                total = buf.sum(-1)
            a_tail = torch.log(total) - b * log_s_t  # log sum_tail pi^b, pi = the renormalised tail
            out["tail_shape"][rows, gi] = torch.where(has_tail[:, 0], a_tail, torch.zeros_like(a_tail))
    else:  # K = V: the head is the whole distribution
        log_s = log_head
        tail_lp = torch.full_like(log_s, -math.inf)
        out["tail_entropy"][rows] = 0.0
        out["tail_shape"][rows] = torch.zeros((c, g), device=z.device)
    out["topk_ids"][rows] = ti[:, :k]
    out["topk_logprobs"][rows] = head_sh - log_s[:, None]
    out["tail_logprob"][rows] = tail_lp
    out["target_logprobs"][rows] = tgt_sh - log_s
    out["log_normaliser"][rows] = log_s + m[:, 0]  # NaN for a row with NaN/inf logits


@torch.no_grad()
def distribution_stats(logits: torch.Tensor, target_ids: torch.Tensor, k: int, betas: torch.Tensor,
                       tail_samples: int = 0, generator: torch.Generator | None = None,
                       block_rows: int | None = None, threads: int | None = None) -> dict[str, torch.Tensor]:
    """Cached quantities of C next-token distributions (methods.md §1), exact over the full vocabulary.

    logits [C, V] float32 (not modified); target_ids [C] int64; betas [G] (1/T for the grid).
    Returns (float32 unless said): topk_ids [C, K] int64 and topk_logprobs [C, K] (log p, normalised
    over all V ids); tail_logprob [C] = log r, r the mass outside the top-K (-inf when K = V);
    tail_entropy [C] = H(pi) and tail_shape [C, G] = log sum_tail pi^b_g of the renormalised tail
    pi = p / r (0 without a tail); target_logprobs [C]; log_normaliser [C] = logsumexp(logits), NaN for
    a row whose logits hold NaN or +inf (checked by `rows_from_hidden`); with tail_samples = S > 0:
    tail_ids [C, S] int64 (-1 pads), tail_counts [C, S] int64 and tail_logshares [C, S] = log pi_j of each
    drawn id (-inf pads): S draws from the tail (`draw_tail`).
    `threads` (CPU only; default torch's intra-op count) threads share the blocks.

    The tail is computed on its own, never as "total minus head": with m the row maximum and m_t the
    tail's maximum (the (K+1)-th logit), sh = z - m_t over the tail ids only (head ids set to -1e30),
    e = exp(sh), s_t = sum e >= 1, so log r = -log(1 + head / tail) is exact even when r ~ 1e-30
    (a confident row), H(pi) = log s_t - sum(e sh) / s_t and log sum_tail pi^b = log sum e^b - b log s_t.
    One exp per entry gives e; a grid point b costs another exp pass unless it is 1/2 (sqrt(e)) or
    twice a point already done (|exp(b/2 sh)|^2, a dot product): the default grid T = 0.5, 0.7, 1.2, 1.4,
    1.65, 2 needs 4 exps and 2 sqrts per entry in all (0.5, 0.7, 1.4, 2 needed 2 and 2; 1.2 and 1.65 were
    added for accuracy, docs/methods.md). The tail draws reuse e: one float64 sum per entry (`draw_tail`).
    Their S uniforms per row are drawn from `generator` before any block runs, in row order, so the draws
    depend neither on the blocks, the threads nor the caller's row chunks (a CPU generator: the same
    uniforms on every device).
    """
    c, v = logits.shape
    dev = logits.device
    blk = block_rows or block_rows_for(v, dev)
    beta_list = [float(b) for b in betas.tolist()]
    order = sorted(range(len(beta_list)), key=lambda g: beta_list[g])
    f32 = dict(dtype=torch.float32, device=dev)
    out = {"topk_ids": torch.empty((c, k), dtype=torch.int64, device=dev),
           "topk_logprobs": torch.empty((c, k), **f32), "tail_logprob": torch.empty(c, **f32),
           "tail_entropy": torch.empty(c, **f32), "tail_shape": torch.empty((c, len(beta_list)), **f32),
           "target_logprobs": torch.empty(c, **f32), "log_normaliser": torch.empty(c, **f32)}
    u = None
    if tail_samples:
        u = tail_uniforms(c, tail_samples, generator, dev)
        out.update(empty_draws(c, tail_samples, dev))
    starts = list(range(0, c, blk))

    def blocks(which: list[int]) -> None:
        for a in which:
            _block_stats(logits[a: a + blk], target_ids[a: a + blk], k, beta_list, order, out, slice(a, a + blk),
                         reuse=dev.type == "cpu", uniforms=u[a: a + blk] if u is not None else None)

    n = threads or torch.get_num_threads()
    if dev.type == "cpu" and n > 1:
        main_threads = torch.get_num_threads()
        pool = _pool(n)
        try:
            for f in [pool.submit(_single_threaded, lambda i=i: blocks(starts[i::n])) for i in range(n)]:
                f.result()
        finally:
            torch.set_num_threads(main_threads)  # the workers' set_num_threads(1) moved the global default
    else:
        blocks(starts)
    return out


def tail_uniforms(c: int, s: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The S uniforms of each of C rows [C, S] float64 on `device`, drawn in row order from `generator` (on its
    own device: a CPU generator gives the same uniforms whatever device computes, and chunks of rows drawn one
    after the other give the same uniforms as one call: CPU generators fill tensors serially)."""
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(c, s, generator=generator, dtype=torch.float64, device=gen_dev).to(device)


def empty_draws(c: int, s: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tail draws of C rows without any: ids -1, counts 0, log-shares -inf (rows without a tail keep these)."""
    return {"tail_ids": torch.full((c, s), -1, dtype=torch.int64, device=device),
            "tail_counts": torch.zeros((c, s), dtype=torch.int64, device=device),
            "tail_logshares": torch.full((c, s), -math.inf, dtype=torch.float32, device=device)}


# Ids per block of the sampler's two-level CDF: one float64 sum per block over the row, then the cumulative sum of
# one block per draw (S·256 entries a row instead of a [C, V] float64 scan; measured below in `draw_tail`).
DRAW_BLOCK = 128
_DRAW_SLAB = 1 << 22  # rows of the second level are done in slabs of at most this many float64 entries


def draw_tail(e: torch.Tensor, sh: torch.Tensor, log_s_t: torch.Tensor, uniforms: torch.Tensor) -> dict[str, torch.Tensor]:
    """S draws per row from the tail pi = e / sum(e), by inverse CDF, as sorted (id, count, log pi) triples.

    e [C, V] the tail's exps exp(sh) (0 on head ids and on ids of probability 0), sh [C, V] the tail's shifted
    logits (log e where e > 0), log_s_t [C] = log sum e, uniforms [C, S] float64 in [0, 1). Draw i of a row is
    the first id whose cumulative e exceeds u_i·sum(e), all in float64 (the last of 262k ids keeps its share; ids
    of probability 0 are never drawn), found in two levels: the block of `DRAW_BLOCK` ids, from the row's block
    sums, then the id, from that block's own cumulative sum. Returns tail_ids [C, S] (distinct ids ascending, -1
    pads), tail_counts [C, S] (draws per id, 0 pads) and tail_logshares [C, S] float32 = log pi_j = sh_j - log s_t
    (-inf pads). A row with sum(e) = 0 (no tail) gets no draws. The draws are a function of the row and its
    uniforms only: the same whatever the blocks, threads or chunks of the caller.
    Cost (`distribution_stats`, CPU, one thread, S = 8, min of 15 interleaved runs on random rows, 2026-12-07):
    torch.multinomial (the sampler before, with a [C, V] int64 count table and a top-S over it) added 27 ns per
    vocabulary entry at V = 8,192 and 12.5 at V = 49,152 to statistics of 14-15 ns; a one-level inverse CDF (a
    [C, V] float64 cumulative sum) 14 and 3; this 3 and 4 (docs/methods.md §1 has the teacher stage's times).
    """
    c, v = e.shape
    s = uniforms.shape[1]
    f64 = torch.float64
    blk = DRAW_BLOCK
    full, nb = v - v % blk, -(-v // blk)
    # Block sums in float32 (cascade summation: ~1e-7 relative, so a block's chance is its mass to that), a view of
    # e, no copy; only the [C, nb] sums go to float64. Inside the chosen block the draw is exact in float64: the
    # uniform's position inside the block (a fraction of its sum) against the block's own cumulative sum.
    sums = torch.empty((c, nb), dtype=torch.float32, device=e.device)
    if full:
        torch.sum(e.as_strided((c, full // blk, blk), (e.stride(0), blk, e.stride(1))), dim=-1,
                  out=sums[:, :full // blk])
    if full < v:
        sums[:, -1] = e[:, full:].sum(-1)
    sums = sums.to(f64)
    cum = sums.cumsum(-1)
    total = cum[:, -1:].contiguous()
    has = total[:, 0] > 0
    x = uniforms * total  # [C, S]
    # u·total rounds up to total for u within 2^-53 of 1: searchsorted then says nb; the last block of positive
    # mass (and below, its last id of positive mass) is the draw.
    b = torch.minimum(torch.searchsorted(cum, x, right=True), torch.searchsorted(cum, total, right=False))
    b.clamp_(max=nb - 1)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(x))
    mass = sums.gather(1, b)
    frac = torch.where(mass > 0, (x - before) / mass.clamp_min(1e-300), torch.zeros_like(x)).clamp_(0.0, 1.0)
    draws = torch.empty((c, s), dtype=torch.int64, device=e.device)
    offs = torch.arange(blk, device=e.device)
    step = max(1, _DRAW_SLAB // (s * blk))
    for a in range(0, c, step):
        rows = slice(a, a + step)
        idx = b[rows, :, None] * blk + offs  # [c', S, blk] the ids of each draw's block
        vals = e[rows].gather(1, idx.clamp(max=v - 1).flatten(1)).view(idx.shape)
        if full < v:
            vals = vals.masked_fill(idx >= v, 0.0)
        inner = vals.cumsum(-1, dtype=f64)  # [c', S, blk]
        end = inner[..., -1:].contiguous()
        pos = torch.minimum(torch.searchsorted(inner, frac[rows, :, None] * end, right=True),
                            torch.searchsorted(inner, end, right=False))
        draws[rows] = (b[rows] * blk + pos[..., 0]).clamp_(max=v - 1)
    d, _ = torch.sort(draws, dim=-1)
    first = torch.ones_like(d, dtype=torch.bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    group = first.cumsum(-1) - 1  # [C, S] the rank of each draw's id among the row's distinct ids
    counts = torch.zeros_like(d).scatter_add_(1, group, torch.ones_like(d))
    ids = torch.full_like(d, -1).scatter_(1, group, d)  # every draw of a group writes the same id
    live = (counts > 0) & has[:, None]
    ids = ids.masked_fill(~live, -1)
    counts = counts.masked_fill(~live, 0)
    share = sh.gather(1, ids.clamp(min=0)) - log_s_t[:, None]
    share = share.masked_fill(~live, -math.inf)
    return {"tail_ids": ids, "tail_counts": counts, "tail_logshares": share}


def sample_tail(z: torch.Tensor, top_ids: torch.Tensor, s: int,
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """`draw_tail` from logits z [C, V] (any per-row shift) and the top-K ids [C, K]: the tail draws of the
    compiled statistics (`compiled_stats` does not return the tail's exps, so this makes one exp pass)."""
    z = z.float()
    u = tail_uniforms(z.shape[0], s, generator, z.device)
    sh = z.scatter(1, top_ids, -math.inf)
    m_t = sh.amax(-1, keepdim=True)
    has = torch.isfinite(m_t)
    sh = (sh - torch.where(has, m_t, torch.zeros_like(m_t))).clamp_(min=_OUT)
    sh.scatter_(1, top_ids, _OUT)
    e = sh.exp()
    e.masked_fill_(~has, 0.0)
    log_s_t = torch.log(e.sum(-1).clamp_min(1.0))
    return draw_tail(e, sh, log_s_t, u)


@torch.no_grad()
def rows_from_hidden(hidden: torch.Tensor, target_ids: torch.Tensor, head: HeadSpec, k: int, betas: torch.Tensor,
                     chunk_rows: int, tail_samples: int = 0, generator: torch.Generator | None = None,
                     compiled: bool = False) -> dict[str, torch.Tensor]:
    """Apply the head to R target hidden states [R, H] in chunks; returns the stats of all R rows.

    Nothing here waits for the device: a row with NaN/inf logits has a non-finite `log_normaliser`, which
    the caller checks once the batch's results are on the host (one sync per batch, not per chunk).
    compiled: the statistics as one `torch.compile`d function (fused kernels on a GPU; see `compiled_stats`;
    off unless the teacher runs with compile "always").
    """
    parts: list[dict[str, torch.Tensor]] = []
    for a in range(0, hidden.shape[0], chunk_rows):
        z = head.logits(hidden[a: a + chunk_rows])
        if compiled:
            part = compiled_stats(z, target_ids[a: a + chunk_rows], k, betas)
            if tail_samples:
                part.update(sample_tail(z, part["topk_ids"], tail_samples, generator))
        else:
            part = distribution_stats(z, target_ids[a: a + chunk_rows], k, betas, tail_samples, generator)
        parts.append(part)
    if not parts:
        raise ValueError("rows_from_hidden needs at least one row")
    if len(parts) == 1:
        return parts[0]
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def _stats_fn(z: torch.Tensor, target_ids: torch.Tensor, k: int, betas: list[float]) -> dict[str, torch.Tensor]:
    """`distribution_stats` (without tail draws) as one functional expression: the same formulas, written
    without out= buffers so that torch.compile can fuse them (a GPU then makes ~3 passes over the logits
    instead of ~13 kernel launches). Values equal the eager path to float32 rounding (tests)."""
    z = z.float()
    c, v = z.shape
    # A literal K + 1, not min(K + 1, V): torch.compile (2.13, dynamic shapes) miscompiled the min on a symbolic
    # V (measured: topk_logprobs off by 4.3 nats). K = V takes the eager path (`compiled_stats`).
    kk = k + 1
    tz, ti = torch.topk(z, kk, dim=-1)
    m = tz[:, :1]
    head_sh = tz[:, :k] - m
    log_head = torch.log(head_sh.exp().sum(-1))
    tgt_sh = z.gather(1, target_ids[:, None]).squeeze(1) - m[:, 0]
    if kk > k:
        z_t = tz[:, k:]
        has_tail = torch.isfinite(z_t)
        shift = torch.where(has_tail, z_t, m)
        sh = (z - shift).clamp(min=_OUT).scatter(1, ti[:, :k], _OUT)
        e = sh.exp()
        s_t = e.sum(-1)
        log_s_t = s_t.log()
        log_tail = (shift - m)[:, 0] + log_s_t
        log_s = torch.logaddexp(log_head, log_tail)
        tail_lp = torch.where(has_tail[:, 0], -torch.logaddexp(log_head - log_tail, torch.zeros_like(log_s)),
                              torch.full_like(log_s, -math.inf))  # as in `_block_stats`: exact on flat rows
        ent = torch.where(has_tail[:, 0], log_s_t - (e * sh).sum(-1) / s_t, torch.zeros_like(log_s))
        shape = torch.stack([(b * sh).exp().sum(-1).log() - b * log_s_t for b in betas], -1)
        shape = torch.where(has_tail, shape, torch.zeros_like(shape))
    else:
        log_s = log_head
        tail_lp = torch.full_like(log_s, -math.inf)
        ent = torch.zeros_like(log_s)
        shape = torch.zeros((c, len(betas)), device=z.device)
    return {"topk_ids": ti[:, :k], "topk_logprobs": head_sh - log_s[:, None], "tail_logprob": tail_lp,
            "tail_entropy": ent, "tail_shape": shape, "target_logprobs": tgt_sh - log_s,
            "log_normaliser": log_s + m[:, 0]}


_COMPILED: dict[str, Callable] = {}


def compiled_stats(z: torch.Tensor, target_ids: torch.Tensor, k: int, betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """`_stats_fn` through torch.compile (compiled once per process, dynamic shapes). Measured on CPU
    (64 x 32,000, one thread): 3.8 ns per vocabulary entry against 4.3 for the hand-blocked eager path,
    after ~24 s of compilation. Used only with `TeacherConfig.compile = "always"`: `auto` is the eager path on every
    device until bench/gpu_suite.py (part teacher, which also checks that both give the same cache) measures
    that compile pays on a GPU."""
    if z.shape[1] <= k:  # K = V: no tail, the eager path
        return distribution_stats(z, target_ids, k, betas)
    fn = _COMPILED.get("stats")
    if fn is None:
        fn = _COMPILED["stats"] = torch.compile(_stats_fn, dynamic=True)
    return fn(z, target_ids, k, [float(b) for b in betas.tolist()])


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
