"""Fidelity per byte: how close each stored teacher format's KD gradient is to the dense float64 teacher's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity.py --quick      # 2,018 rows, ~2 min once the teachers exist
    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity.py --rows 25000 --json runs/bench/fidelity.json   # ~30 min
    ... --distillkit-src /tmp/distillkit     # also DistillKit's compressor, from a local checkout
    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity.py --smoke      # pipeline check on 10-step models, ~2 min

The teachers and the student are the real-text ones of `bench/realtext.py` (built first if missing,
about 20 minutes). On the same held-out target rows, for each teacher (trained, sharpened x2), student
(`trained`: the 4-minute student; `mix0.5`: its log-probs moved halfway to the teacher's, i.e. late in
distillation, where q^T is close to p^T and a format's own errors are no longer hidden by a large
gradient) and temperature T (1, 0.5, 2 and the off-grid 1.2), with p^T = softmax(log p / T) and
q^T = softmax(z / T) (z the student's logits there, float64), the dense forward-KL gradient w.r.t. z
is g = (q^T - p^T) / T. Each format yields the gradient of its own KD loss (`bench/peers.py` has the
formula; on the first block every format's formula is compared with autograd through its loss as its
project writes it, and the fast cosines with the dense ones; `--no-check` skips that). Reported:

  bytes/token   every file of the format's stored representation / rows (kdcache: the whole cache
                directory, `Cache.bytes_on_disk()`; peers: the files their writers produce)
  cos/pos       cosine(grad_F, g) per row: mean and 10th percentile
  cos batch     cosine of the gradients summed over consecutive 4,096-row batches (the gradient of a
                shared output bias), mean over batches (a trailing partial batch counts as one)
  TVD, KL       on the format's own partition (its support ids + one rest bucket): true p^T
                coarse-grained vs the format's decoded masses; KL(true || decoded), "inf" when a row has
                true mass where the format decodes none (formats that drop the tail)
  tail err      |r_F - r| / r for the mass outside the support (median, max), and the fraction of rows
                whose decoded rest is exactly 0 while r > 0

Formats: kdcache (the REAL path: `run_teacher` -> `open_cache` -> `read`, all in `kdcache_rows`, the one
place that knows the cache format), ideal K + 1 buckets (float64, no codec: the design's bound; its
bytes are the raw size K x (2 + 8) + 8, not a file), top-K renormalised (DistillKit "zero", axolotl),
top-K + ghost bucket (Megatron-LM), sampled KD (12 and 24 draws), DistillKit's compressor (optional).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import peers  # noqa: E402
import realtext  # noqa: E402
from peers import Decoded  # noqa: E402

TEMPERATURES = (1.0, 0.5, 2.0, 1.2)
BATCH_ROWS = 4096
BUDGETS = (24, 36, 48, 80, 132)


# ---- kdcache: the one adapter that knows the cache format ----------------------------------------------

def kdcache_rows(cache: Any, a: int, b: int, temperature: float) -> tuple[Decoded, Callable[[torch.Tensor], torch.Tensor]]:
    """Rows [a, b) of a kdcache cache as the student stage decodes them at temperature T.

    -> (Decoded: K ids, tempered head masses, tempered tail bucket; loss(z [n, V]) -> [n], the fkl on
    K + 1 buckets exactly as `kdcache train` computes it, for --check).
    Format 3: the tail mass is stored (`tail_logprob`); at T != 1 the tail's power sum T(1/T) is
    interpolated from the cached tail statistics (`tail_log_partition_at`) and the tempered buckets, which
    sum to one by construction, come from `teacher_log_buckets`.
    """
    from pipeline.losses.divergences import kd_divergence, teacher_log_buckets
    from pipeline.losses.temperature import tail_log_partition_at

    r = cache.read(a, b, ("topk_ids", "topk_logprobs", "tail_logprob", "tail_entropy", "tail_log_partition"))
    ids = torch.as_tensor(r["topk_ids"])
    lp = torch.as_tensor(r["topk_logprobs"]).double()
    n, k = lp.shape
    beta = torch.full((n,), 1.0 / temperature, dtype=torch.float64)
    grid = torch.tensor([1.0 / t for t in cache.temperatures], dtype=torch.float64)
    tail = tail_log_partition_at(beta, grid, *(torch.as_tensor(r[f]).double() for f in
                                               ("tail_log_partition", "tail_logprob", "tail_entropy")),
                                 cache.params.n_tail)
    log_b = teacher_log_buckets(lp, tail, beta)
    dec = Decoded(ids, torch.ones_like(ids, dtype=torch.bool), log_b[:, :k].exp(), log_b[:, k].exp())

    def loss(z: torch.Tensor) -> torch.Tensor:
        return kd_divergence("fkl", z, ids, lp, tail, beta, torch.full((n,), temperature, dtype=torch.float64),
                             cache.vocab_size)

    return dec, loss


def kdcache_draws_rows(cache: Any, a: int, b: int, temperature: float) -> Decoded:
    """Rows [a, b) of a kdcache cache with tail draws, as `--tail sampled` trains fkl on them at temperature T
    (`pipeline/losses/sampled.py`): the K tempered head masses, and on each drawn id j the importance-weighted share
    R_T (c_j / S) p_j^b / (pi_j sum_tail p^b) of the tempered tail mass R_T (b = 1/T, pi_j = p_j / r; at T = 1 this is
    r c_j / S), the tail bucket only on a row without draws. Unbiased: its expectation over draw sets is the dense
    tempered tail, so the cosine here is that of ONE draw set (each row's own noise)."""
    from pipeline.losses.divergences import teacher_log_buckets
    from pipeline.losses.temperature import tail_log_partition_at

    r = cache.read(a, b, ("topk_ids", "topk_logprobs", "tail_logprob", "tail_entropy", "tail_log_partition",
                          "tail_ids", "tail_counts", "tail_logprobs"))
    ids, t_ids = torch.as_tensor(r["topk_ids"]), torch.as_tensor(r["tail_ids"]).long()
    lp = torch.as_tensor(r["topk_logprobs"]).double()
    n, k = lp.shape
    counts = torch.as_tensor(r["tail_counts"]).double()
    ok = (counts > 0) & (t_ids >= 0)
    counts = counts.masked_fill(~ok, 0.0)
    total = counts.sum(-1, keepdim=True)
    beta = torch.full((n,), 1.0 / temperature, dtype=torch.float64)
    grid = torch.tensor([1.0 / t for t in cache.temperatures], dtype=torch.float64)
    log_r = torch.as_tensor(r["tail_logprob"]).double()
    tail = tail_log_partition_at(beta, grid, torch.as_tensor(r["tail_log_partition"]).double(), log_r,
                                 torch.as_tensor(r["tail_entropy"]).double(), cache.params.n_tail)
    log_b = teacher_log_buckets(lp, tail, beta)
    big_r = log_b[:, k].exp()
    lpj = torch.as_tensor(r["tail_logprobs"]).double()
    # log of p_j^b / (pi_j sum_tail p^b) = b log p_j - (log p_j - log r) - T(b)
    log_w = torch.where(ok, beta[:, None] * lpj - (lpj - log_r[:, None]) - tail[:, None], torch.zeros_like(lpj))
    share = torch.where(total > 0, counts / total.clamp_min(1e-300), torch.zeros_like(counts)) * log_w.exp()
    return Decoded(torch.cat([ids, t_ids.clamp_min(0)], 1), torch.cat([torch.ones_like(ids, dtype=torch.bool), ok], 1),
                   torch.cat([log_b[:, :k].exp(), share * big_r[:, None]], 1),
                   torch.where(total[:, 0] > 0, torch.zeros_like(big_r), big_r))


def kdcache_build(prepared: Path, model: Path, out: Path, k: int, tail_samples: int = 0) -> Any:
    """Cache `prepared` with `model` at top-K `k` (and `tail_samples` draws) through `run_teacher` (reused when
    it already matches): the default preset's codec for K <= 8, the hifi preset's beyond."""
    from pipeline.cache import open_cache
    from pipeline.errors import KdError
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    # K <= 8: the default preset's precisions; larger K: the hifi preset's (docs/cache-format.md).
    cfg = TeacherConfig(data=str(prepared), model=str(model), out=str(out), top_k=k, device="cpu",
                        dtype="float32", threads=1, preset="default" if k <= 8 else "hifi", tail_samples=tail_samples)
    try:
        run_teacher(cfg)  # skips committed shards of a matching cache
    except KdError:  # another teacher / data / format version at `out`: rebuild it
        cfg.overwrite = True
        run_teacher(cfg)
    return open_cache(out)


# ---- metrics ------------------------------------------------------------------------------------------

def support_mask(dec: Decoded, v: int) -> torch.Tensor:
    """[n, V] bool: the ids in the format's support (pads excluded, duplicates harmless)."""
    m = torch.zeros(dec.ids.shape[0], v, dtype=torch.float64)
    m.scatter_add_(1, dec.ids, dec.valid.double())
    return m > 0


def format_grad(dec: Decoded, q: torch.Tensor, temperature: float, in_s: torch.Tensor) -> torch.Tensor:
    """∂L/∂z of -Σ_S P log q^T - R log Q^T_rest (bench/peers.py docstring): [n, V] float64."""
    p = torch.zeros_like(q).scatter_add_(1, dec.ids, torch.where(dec.valid, dec.mass, torch.zeros_like(dec.mass)))
    total = torch.where(dec.valid, dec.mass, torch.zeros_like(dec.mass)).sum(-1) + dec.tail
    g = total[:, None] * q - p
    if bool((dec.tail > 0).any()):
        rest = torch.where(in_s, torch.zeros_like(q), q)
        q_rest = rest.sum(-1)  # summed over the rest, not 1 - Σ_S, so a tiny rest keeps its digits
        g -= (dec.tail / q_rest.clamp_min(1e-300))[:, None] * rest
    return g / temperature


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of [n, V] tensors -> [n] (0 where either row is 0)."""
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


class Block:
    """What every format shares for one block of rows at one temperature (dense passes done once).

    pt, q [n, V] float64 teacher / student at T; the dense gradient is g = q - pt up to the common 1/T,
    which no cosine sees. Precision: on a confident row p and q both put 1 - 1e-20 on the teacher's
    top id j*, where q - p rounds to noise while every other entry is exact; since a KD gradient
    sums to zero over the vocabulary (every format's does too), the j* entry is recomputed as minus the
    sum of the others. So the block keeps q', g' (j* entry zeroed), g* (the exact j* entry of g) and the
    row dot products qg = q'·g', qq = q'·q', gg = |g|², and q_o = Σ_{j != j*} q_j.
    Per support set S (cached by its sorted ids): q_rest = Σ_{∉S} q^T and r = Σ_{∉S} p^T, each one
    batched dot product with the complement mask (not 1 - Σ_S, which loses a small rest's digits).
    """

    def __init__(self, pt: torch.Tensor, log_pt: torch.Tensor, z: torch.Tensor, t: float, row0: int):
        n = len(pt)
        self.pt = pt
        log_q = torch.log_softmax(z / t, dim=-1)
        self.q = log_q.exp()
        self.kl_pq = _rowdot(pt, log_pt - log_q)  # [n] dense KL(p^T || q^T): how far the student is
        self.jstar = pt.argmax(dim=-1)
        rows = torch.arange(n)
        self.qp = self.q.clone()
        self.qp[rows, self.jstar] = 0.0
        self.gp = self.q - pt
        self.gp[rows, self.jstar] = 0.0
        self.g_star = -self.gp.sum(-1)
        self.q_o = self.qp.sum(-1)
        self.qg, self.qq = _rowdot(self.qp, self.gp), _rowdot(self.qp, self.qp)
        self.gg = _rowdot(self.gp, self.gp) + self.g_star**2
        self.row0, self.t, self.z = row0, t, z
        self.batches = (torch.arange(row0, row0 + n) // BATCH_ROWS)
        self._rest: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def dense_g(self) -> torch.Tensor:
        """g = q - p [n, V] with the exact j* entry (for batch sums and --check)."""
        g = self.gp.clone()
        g[torch.arange(len(g)), self.jstar] = self.g_star
        return g

    def rest(self, dec: Decoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_rest, r) [n] outside this format's support."""
        key = torch.where(dec.valid, dec.ids, torch.full_like(dec.ids, -1)).sort(dim=1).values
        for k, qr, r in self._rest:
            if k.shape == key.shape and torch.equal(k, key):
                return qr, r
        out = (~support_mask(dec, self.q.shape[1])).double()
        qr, r = _rowdot(self.q, out), _rowdot(self.pt, out)
        self._rest.append((key, qr, r))
        return qr, r


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise a·b for [n, V] without an [n, V] temporary -> [n]."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def sparse_grad(dec: Decoded, blk: Block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The format's gradient T·∂L/∂z written as α·q' + D + G*·e_{j*}, D non-zero only on the support.

    From `format_grad`: on the rest α q_j with α = S - R / Q_rest (S = Σ_S P + R), on the support
    S q_i - P_i = α q_i + (R / Q_rest) q_i - P_i; the j* entry is G* = -(the sum of all others), see
    `Block`. -> α [n], D [n, M] (0 at j*), G* [n], cos(grad, g) [n], from gathers and the block's row
    dot products: G·g = α q'·g' + Σ_S D g' + G* g*, |G|² = α² q'·q' + 2α Σ_S q' D + Σ_S D² + G*².
    """
    p = torch.where(dec.valid, dec.mass, torch.zeros_like(dec.mass))
    live = dec.valid & (dec.ids != blk.jstar[:, None])
    q_s = torch.where(live, blk.qp.gather(1, dec.ids), torch.zeros_like(p))
    g_s = torch.where(live, blk.gp.gather(1, dec.ids), torch.zeros_like(p))
    q_rest, _ = blk.rest(dec)
    c = torch.where(dec.tail > 0, dec.tail / q_rest.clamp_min(1e-300), torch.zeros_like(dec.tail))
    alpha = p.sum(-1) + dec.tail - c
    d = torch.where(live, c[:, None] * q_s - p, torch.zeros_like(p))
    g_star = -(alpha * blk.q_o + d.sum(-1))
    gg_f = (alpha**2 * blk.qq + 2 * alpha * (q_s * d).sum(-1) + (d * d).sum(-1) + g_star**2).clamp_min(0.0)
    num = alpha * blk.qg + (d * g_s).sum(-1) + g_star * blk.g_star
    den = (gg_f * blk.gg).sqrt()
    cos = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return alpha, d, g_star, cos


@dataclass
class Acc:
    """Per (format, T) accumulators over rows."""

    cos: list = field(default_factory=list)
    tvd: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    tail_rel: list = field(default_factory=list)
    tail_zero: list = field(default_factory=list)
    batch_f: dict = field(default_factory=dict)  # batch index -> Σ_rows grad_F [V]
    batch_g: dict = field(default_factory=dict)  # batch index -> Σ_rows g [V]

    def add(self, dec: Decoded, blk: Block) -> None:
        alpha, d, g_star, cos = sparse_grad(dec, blk)
        self.cos.append(cos)
        for bi in blk.batches.unique().tolist():
            sel = blk.batches == bi
            sum_f = alpha[sel] @ blk.qp[sel]
            sum_f.index_add_(0, dec.ids[sel].reshape(-1), d[sel].reshape(-1))
            sum_f.index_add_(0, blk.jstar[sel], g_star[sel])
            sum_g = blk.gp[sel].sum(0).index_add_(0, blk.jstar[sel], blk.g_star[sel])
            self.batch_f[bi] = self.batch_f.get(bi, 0) + sum_f
            self.batch_g[bi] = self.batch_g.get(bi, 0) + sum_g
        # Bucket view on the format's own partition: support ids + the rest.
        vm = torch.where(dec.valid, dec.mass, torch.zeros_like(dec.mass))
        true_s = torch.where(dec.valid, blk.pt.gather(1, dec.ids), torch.zeros_like(vm))
        _, r_true = blk.rest(dec)
        self.tvd.append(0.5 * ((true_s - vm).abs().sum(-1) + (r_true - dec.tail).abs()))
        self.kl.append(_kl(true_s, vm).sum(-1) + _kl(r_true, dec.tail))
        self.tail_rel.append((dec.tail - r_true).abs() / r_true.clamp_min(1e-300))
        self.tail_zero.append((dec.tail == 0) & (r_true > 0))

    def summary(self) -> dict[str, float]:
        cos = torch.cat(self.cos).numpy()
        kl = torch.cat(self.kl).numpy()
        rel = torch.cat(self.tail_rel).numpy()
        bc = [float(cosine(self.batch_f[i][None], self.batch_g[i][None])) for i in sorted(self.batch_f)]
        return {"rows": int(len(cos)), "cos_mean": float(cos.mean()), "cos_p10": float(np.quantile(cos, 0.1)),
                "cos_batch": float(np.mean(bc)), "batches": len(bc), "tvd": float(torch.cat(self.tvd).mean()),
                "kl": float(kl.mean()), "kl_inf_rows": float(np.isinf(kl).mean()),
                "tail_rel_median": float(np.median(rel)), "tail_rel_max": float(rel.max()),
                "tail_zero_frac": float(torch.cat(self.tail_zero).double().mean())}


def _kl(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Elementwise p·log(p/d): 0 where p = 0, +inf where p > 0 = d."""
    live = p > 0
    ok = live & (d > 0)
    val = torch.where(ok, p * (p.clamp_min(1e-300).log() - d.clamp_min(1e-300).log()), torch.zeros_like(p))
    return torch.where(live & ~ok, torch.full_like(p, math.inf), val)


# ---- the run ------------------------------------------------------------------------------------------

def subset_prepared(b: Any, rows: int, out: Path) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Held-out examples holding >= `rows` targets, written as a prepared dataset for `run_teacher`."""
    from pipeline.data.prepare import prepared_meta, write_prepared

    ids, masks, n = realtext.heldout_subset(b, rows)
    fp = hashlib.sha256()
    for a, m in zip(ids, masks):  # the same fingerprint formula as `pipeline.data.prepare.prepare`
        fp.update(np.int64(len(a)).tobytes() + a.astype(np.int64).tobytes() + m.astype(np.int8).tobytes())
    meta = dict(prepared_meta(b.prepared_heldout))
    meta.update({"fingerprint": fp.hexdigest(), "examples": len(ids), "tokens": int(sum(map(len, ids))),
                 "targets": n, "data": f"{b.prepared_heldout} (first {len(ids)} examples)"})
    old = out / "kdcache_prepare.json"
    if not (old.is_file() and json.loads(old.read_text()).get("fingerprint") == meta["fingerprint"]):
        write_prepared(out, [a.tolist() for a in ids], [m.tolist() for m in masks], meta)
    return ids, masks, n


def run_teacher_formats(args: argparse.Namespace, b: Any, name: str, model_dir: Path, ids: list[np.ndarray],
                        masks: list[np.ndarray], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """All formats x temperatures for one teacher -> {format key: {"bytes", "family", "param", "T": {...}}}."""
    ks = sorted(args.ks)
    kmax = max(ks)
    caches = {}
    for k in ks:
        t0 = time.perf_counter()
        caches[k] = kdcache_build(work / "prepared", model_dir, work / name / f"kdcache_k{k}", k)
        log(f"  {name}: kdcache K={k} ready ({caches[k].num_rows:,} rows, {time.perf_counter() - t0:.0f}s)")
    drawn = {s_: kdcache_build(work / "prepared", model_dir, work / name / f"kdcache_k{ks[0]}_s{s_}", ks[0], s_)
             for s_ in args.kdcache_draws}
    vocab = caches[ks[0]].vocab_size
    dk = [peers.DistillKitCompressor(args.distillkit_src, p, vocab) for p in ("budget", "recommended")] \
        if args.distillkit_src else []
    teacher = realtext._load(model_dir)
    student = realtext._load(b.student)
    mixes = {s: _mix_of(s) for s in args.students}
    tgt = np.concatenate([i[m.astype(bool)] for i, m in zip(ids, masks)])
    acc: dict[tuple[str, str, float], Acc] = {}  # (student, format, T)
    student_kl: dict[tuple[str, float], list] = {}
    stored = {"ids": [], "lp32": [], "sampled": {}, "dk": {p.preset: [] for p in dk}}
    # Seeded per (teacher, T, draws) from a digest (Python's hash() of a str changes per process).
    gens = {(t, n): torch.Generator().manual_seed(int(hashlib.sha256(f"{name}:{t:g}:{n}".encode()).hexdigest()[:8], 16))
            for t in args.temperatures for n in args.draws}
    checked = not args.check
    row, worst_lp_err, t_start = 0, 0.0, time.perf_counter()
    bt = args.block_tokens
    for zt, zs in zip(realtext.target_logits(teacher, ids, masks, bt), realtext.target_logits(student, ids, masks, bt)):
        n = len(zt)
        a, bb = row, row + n
        lp64 = torch.log_softmax(zt.double(), dim=-1)
        lp32 = torch.log_softmax(zt, dim=-1)  # what peers' writers see: fp32 log-probs
        top_lp32, top_ids = lp32.topk(max(kmax, *(p.k for p in dk)) if dk else kmax, dim=-1)
        # The cache must hold these very rows: same targets, log-probs within the codec's bound.
        c0 = caches[ks[0]]
        raw = c0.read(a, bb)
        assert np.array_equal(raw["target_ids"], tgt[a:bb]), "cache rows and benchmark rows differ"
        worst_lp_err = max(worst_lp_err, float((lp64.gather(1, torch.as_tensor(raw["topk_ids"])) -
                                               torch.as_tensor(raw["topk_logprobs"]).double()).abs().max()))
        stored["ids"].append(top_ids[:, :kmax].numpy())
        stored["lp32"].append(top_lp32[:, :kmax].numpy())
        dk_dec = []
        for p in dk:
            enc, d_ids, d_lp = p.roundtrip(top_ids[:, : p.k], top_lp32[:, : p.k])
            stored["dk"][p.preset].append(enc)
            dk_dec.append((p, d_ids, d_lp))
        zs64 = torch.log_softmax(zs.double(), dim=-1)
        for t in args.temperatures:
            log_pt = torch.log_softmax(lp64 / t, dim=-1)
            pt = log_pt.exp()
            blks = {s: Block(pt, log_pt, zs64 if m == 0 else (1 - m) * zs64 + m * lp64, t, row) for s, m in mixes.items()}
            for s, bl in blks.items():
                student_kl.setdefault((s, t), []).append(bl.kl_pq)
            blk = next(iter(blks.values()))
            fmts: dict[str, tuple[Decoded, Callable | None]] = {}
            for k in ks:
                fmts[f"kdcache K={k}"] = kdcache_rows(caches[k], a, bb, t)
                ideal_ids = blk.pt.topk(k, dim=-1).indices
                ideal = Decoded(ideal_ids, torch.ones_like(ideal_ids, dtype=torch.bool), blk.pt.gather(1, ideal_ids),
                                torch.zeros(n, dtype=torch.float64))
                ideal.tail = blk.rest(ideal)[1]  # the exact rest, summed (no 1 - Σ cancellation)
                fmts[f"ideal K+1 K={k}"] = (ideal, None)
                fmts[f"top-K renorm K={k}"] = (peers.TopKRenorm.decode(top_ids[:, :k], top_lp32[:, :k], t),
                                               _renorm_loss(top_ids[:, :k], top_lp32[:, :k], t))
                v16 = peers.MegatronGhost.quantise(top_lp32[:, :k])
                fmts[f"top-K + ghost K={k}"] = (peers.MegatronGhost.decode(top_ids[:, :k], v16, t),
                                                _ghost_loss(top_ids[:, :k], v16, t))
            for s_, c_ in drawn.items():  # importance-weighted at T != 1 (the draws' log-probs are cached)
                fmts[f"kdcache K={ks[0]} + {s_} draws"] = (kdcache_draws_rows(c_, a, bb, t), None)
            for nd in args.draws:
                s_ids, q7 = peers.SampledKD(nd).sample(blk.pt, gens[(t, nd)])
                stored["sampled"].setdefault((t, nd), []).append((s_ids, q7))
                fmts[f"sampled KD N={nd}"] = (peers.SampledKD.decode(s_ids, q7), _sampled_loss(s_ids, q7, t))
            for p, d_ids, d_lp in dk_dec:
                fmts[f"DistillKit {p.preset} k={p.k}"] = (peers.TopKRenorm.decode(d_ids, d_lp, t),
                                                          _renorm_loss(d_ids, d_lp, t))
            for key, (dec, loss) in fmts.items():
                for s, bl in blks.items():
                    acc.setdefault((s, key, t), Acc()).add(dec, bl)
                if not checked:
                    _check(key, t, dec, loss, blk.z, blk, log)
            del blk, blks, pt, log_pt
        checked = True
        row = bb
        if args.rows > 5000:
            log(f"  {name}: {row:,}/{len(tgt):,} rows ({time.perf_counter() - t_start:.0f}s)")
    log(f"  {name}: max |log p_cache - log p_float64| over the cached head = {worst_lp_err:.5f} (codec bound: head_step + 2^-10 = 0.041 default, 0.021 hifi; plus float32 logits from another batching)")

    # Bytes on disk, each format its own files.
    counts = [int(m.sum()) for m in masks]
    all_ids, all_lp = np.concatenate(stored["ids"]), np.concatenate(stored["lp32"])
    out: dict[str, Any] = {}
    for k in ks:
        out[f"kdcache K={k}"] = {"family": "kdcache", "param": k, "bytes": caches[k].bytes_on_disk() / caches[k].num_rows}
        out[f"ideal K+1 K={k}"] = {"family": "ideal K+1", "param": k, "bytes": k * 10 + 8.0, "raw": True}
        if k == ks[0]:
            for s_, c_ in drawn.items():
                out[f"kdcache K={k} + {s_} draws"] = {"family": "kdcache + draws", "param": f"{k} + {s_}",
                                                     "bytes": c_.bytes_on_disk() / c_.num_rows}
        nb = peers.TopKRenorm(k).store(work / name / f"renorm_k{k}", all_ids[:, :k], all_lp[:, :k])
        out[f"top-K renorm K={k}"] = {"family": "top-K renorm", "param": k, "bytes": nb / len(all_ids)}
        v16 = all_lp[:, :k].astype(np.float16)
        nb = peers.MegatronGhost(k).store(work / name / f"megatron_k{k}", all_ids[:, :k], v16, counts)
        out[f"top-K + ghost K={k}"] = {"family": "top-K + ghost", "param": k, "bytes": nb / len(all_ids)}
    for nd in args.draws:
        by_t = {}
        for t in args.temperatures:
            parts = stored["sampled"][(t, nd)]
            s_ids = torch.cat([p[0] for p in parts])
            q7 = torch.cat([p[1] for p in parts])
            by_t[t] = peers.SampledKD(nd).store(work / name / f"sampled_n{nd}_t{t:g}", s_ids, q7, counts, vocab) / len(s_ids)
        out[f"sampled KD N={nd}"] = {"family": "sampled KD", "param": nd, "bytes": float(np.mean(list(by_t.values()))),
                                     "bytes_by_T": by_t}
    for p in dk:
        nb = peers.DistillKitCompressor.store(work / name / f"distillkit_{p.preset}", stored["dk"][p.preset], counts)
        out[f"DistillKit {p.preset} k={p.k}"] = {"family": "DistillKit", "param": f"{p.preset} k={p.k}",
                                                 "bytes": nb / len(all_ids)}
    metrics: dict[str, Any] = {}
    for (s, key, t), a_ in acc.items():
        metrics.setdefault(s, {}).setdefault(key, {})[t] = a_.summary()
    kl = {s: {t: float(torch.cat(v).mean()) for (s2, t), v in student_kl.items() if s2 == s} for s in mixes}
    return {"formats": out, "metrics": metrics, "student_kl": kl}


def _mix_of(student: str) -> float:
    """'trained' -> 0; 'mixA' -> A: the student's log-probs moved a fraction A towards the teacher's."""
    if student == "trained":
        return 0.0
    if student.startswith("mix") and 0.0 < float(student[3:]) < 1.0:
        return float(student[3:])
    raise SystemExit(f"--students: unknown student {student!r} (use trained or mixA with 0 < A < 1)")


def _renorm_loss(ids: torch.Tensor, lp: torch.Tensor, t: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """DistillKit `sparse_kl_div_inner` with missing=zero, written as it computes (α = 1/T)."""
    def loss(z: torch.Tensor) -> torch.Tensor:
        s_lp = z / t - torch.logsumexp(z / t, dim=-1, keepdim=True)
        a = lp.double() / t
        t_lp = a - torch.logsumexp(a, dim=-1, keepdim=True)
        return (t_lp.exp() * (t_lp - s_lp.gather(1, ids))).sum(-1)
    return loss


def _ghost_loss(ids: torch.Tensor, v16: torch.Tensor, t: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Megatron `topk_kl_div(add_ghost_token=True)`; at T != 1 the re-tempered K + 1 teacher entries."""
    dec = peers.MegatronGhost.decode(ids, v16, t)

    def loss(z: torch.Tensor) -> torch.Tensor:
        s_lp = torch.log_softmax(z / t, dim=-1).gather(1, ids)
        s_res = torch.log((1.0 - s_lp.exp().sum(-1, keepdim=True)).clamp(min=1e-8))
        t_lp = torch.cat([dec.mass.log(), dec.tail.log()[:, None]], dim=1)
        return (t_lp.exp() * (t_lp - torch.cat([s_lp, s_res], dim=1))).sum(-1)
    return loss


def _sampled_loss(ids: torch.Tensor, q7: torch.Tensor, t: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """SampledKD's cached path: -Σ probs · log_softmax(student)[ids] (+ the constant Σ probs log probs)."""
    dec = peers.SampledKD.decode(ids, q7)

    def loss(z: torch.Tensor) -> torch.Tensor:
        s_lp = torch.log_softmax(z / t, dim=-1).gather(1, dec.ids)
        return -(torch.where(dec.valid, dec.mass, torch.zeros_like(dec.mass)) * s_lp).sum(-1)
    return loss


def _check(key: str, t: float, dec: Decoded, loss: Callable | None, z: torch.Tensor, blk: Block,
           log: Callable) -> None:
    """On one block: (1) the dense gradient formula against autograd through the format's own loss as its
    project writes it; (2) the sparse per-row cosine against the cosine of that dense gradient. Exits
    on a mismatch."""
    dense = format_grad(dec, blk.q, t, support_mask(dec, blk.q.shape[1]))
    msg = f"  check {key:32s} T={t:g}:"
    if loss is not None:
        zz = z.clone().requires_grad_(True)
        (ag,) = torch.autograd.grad(loss(zz).sum(), zz)
        err = float((ag - dense).abs().max() / dense.abs().max().clamp_min(1e-300))
        msg += f" |autograd - formula| / max|grad| = {err:.1e};"
        if not err < 1e-6:
            raise SystemExit(f"gradient formula disagrees with autograd for {key} at T={t}: {err}")
    rows = torch.arange(len(dense))
    dense[rows, blk.jstar] = 0.0
    dense[rows, blk.jstar] = -dense.sum(-1)  # the zero-sum fix of `Block`, so both sides are exact
    cos_err = float((sparse_grad(dec, blk)[3] - cosine(dense, blk.dense_g())).abs().max())
    log(msg + f" |cos sparse - cos dense| = {cos_err:.1e}")
    if not cos_err < 1e-6:  # the |G|² expansion cancels digits when R / Q_rest is large; 1e-6 is far below what is reported
        raise SystemExit(f"sparse cosine disagrees with the dense one for {key} at T={t}: {cos_err}")


# ---- output -------------------------------------------------------------------------------------------

FAMILIES = ("kdcache", "kdcache + draws", "ideal K+1", "top-K renorm", "top-K + ghost", "sampled KD", "DistillKit")


def _f(x: float, nd: int = 4) -> str:
    return "inf" if math.isinf(x) else f"{max(x, 0.0) if x > -1e-9 else x:.{nd}f}"  # no "-0.0000" from rounding


def _g(x: float) -> str:
    """3 significant digits; relative tail errors span 0 to ~1e13 (a tail of 1e-14 decoded as 0.1)."""
    return "inf" if math.isinf(x) else f"{x:.3g}"


def markdown(results: dict[str, Any], temps: list[float]) -> str:
    """Per teacher, student and temperature: one row per format; then the equal-bytes view."""
    lines = []
    for name, res in results["teachers"].items():
        st = res["stats"]
        lines.append(f"\n## Teacher `{name}`: held-out mean entropy {st['mean_entropy']:.3f} nats, median top-32 mass "
                     f"{st['median_top32_mass']:.4f}, CE {st['ce']:.3f} ({results['rows']:,} rows)\n")
        fmts = res["formats"]
        for s, per_fmt in res["metrics"].items():
            kl = res["student_kl"][s]
            lines.append(f"\n### {name}, student `{s}` (dense KL(p^T || q^T) per row: "
                         + ", ".join(f"{kl[t]:.3f} at T={t:g}" for t in temps) + ")\n")
            for t in temps:
                lines.append(f"\n**{name}, student {s}, T = {t:g}**\n")
                lines.append("| format | K / draws | bytes/token | cos/pos mean | cos/pos p10 | cos batch | bucket TVD | "
                             "bucket KL | tail err median / max | tail = 0 |")
                lines.append("|---|---|---|---|---|---|---|---|---|---|")
                for key, f in fmts.items():
                    m = per_fmt[key].get(t)
                    if m is None:  # a format measured at T = 1 only (cached draws)
                        continue
                    by = f.get("bytes_by_T", {}).get(t, f["bytes"])
                    raw = " (raw)" if f.get("raw") else ""
                    lines.append(f"| {f['family']} | {f['param']} | {by:.1f}{raw} | {m['cos_mean']:.4f} | "
                                 f"{m['cos_p10']:.4f} | {m['cos_batch']:.5f} | {m['tvd']:.4f} | {_f(m['kl'])} | "
                                 f"{_g(m['tail_rel_median'])} / {_g(m['tail_rel_max'])} | {m['tail_zero_frac']:.3f} |")
            lines.append(f"\n**{name}, student {s}: at equal bytes** (best setting of each format within the budget, "
                         "by mean per-position cosine; cell = cos/pos mean / cos batch (setting, bytes); ideal K+1 is a "
                         "bound, not a stored format, and is left out)\n")
            fams = [fa for fa in FAMILIES if fa != "ideal K+1" and any(f["family"] == fa for f in fmts.values())]
            lines.append("| T | budget (bytes/token) | " + " | ".join(fams) + " |")
            lines.append("|---|---|" + "---|" * len(fams))
            for t in temps:
                for budget in BUDGETS:
                    cells = []
                    for fa in fams:
                        best = None
                        for key, f in fmts.items():
                            by = f.get("bytes_by_T", {}).get(t, f["bytes"])
                            if f["family"] == fa and by <= budget and t in per_fmt[key]:
                                m = per_fmt[key][t]
                                if best is None or m["cos_mean"] > best[0]["cos_mean"]:
                                    best = (m, f, by)
                        cells.append("-" if best is None else f"{best[0]['cos_mean']:.4f} / {best[0]['cos_batch']:.4f} "
                                     f"({best[1]['param']}, {best[2]:.0f})")
                    lines.append(f"| {t:g} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_llm_bench(root: Path) -> tuple[Any, dict[str, Path], str]:
    """SmolLM2-135M-Instruct (bench/real_llm.py) as the teacher, its first 6 layers as the student, 256 of this
    machine's doc texts (up to 512 tokens each) as the held-out rows: (bundle, teachers, description)."""
    import types

    import real_llm

    teacher = real_llm.ensure_teacher(root)
    student = real_llm.ensure_student(teacher, 6)
    prepared = real_llm.ensure_prepared(teacher, root / "prepared_fidelity", records=256)
    return (types.SimpleNamespace(prepared_heldout=prepared, student=student), {"smollm2": teacher},
            "this machine's doc texts (SmolLM2-135M-Instruct, V = 49,152)")


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks instead of unmapping them.

    Every block allocates a few [rows, V] float64 arrays (~30 MB each), above glibc's mmap threshold,
    so each is a fresh mmap whose pages the kernel zero-fills on first touch: measured 41 s of system
    time against 29 s of user time on the --quick run. With the thresholds raised the arrays reuse
    the heap (3 s of system time). No effect (and no error) on other C libraries.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/bench", help="bench/realtext.py's directory (built when missing)")
    ap.add_argument("--rows", type=int, default=25000, help="held-out target rows (whole examples, so a few more)")
    ap.add_argument("--quick", action="store_true", help="~2,000 rows")
    ap.add_argument("--smoke", action="store_true",
                    help="pipeline check: 10-step models under runs/bench-smoke, 300 rows (numbers meaningless)")
    ap.add_argument("--teachers", default="teacher,teacher_sharp", help="comma list of teacher, teacher_sharp")
    ap.add_argument("--ks", default="8,16,32", help="K of every top-K format")
    ap.add_argument("--draws", default="12,24", help="sampled-KD draws per row")
    ap.add_argument("--temperatures", default=",".join(f"{t:g}" for t in TEMPERATURES))
    ap.add_argument("--students", default="trained,mix0.5",
                    help="trained: the student as trained; mixA: its log-probs moved a fraction A towards the "
                         "teacher's (log-linear), a student late in distillation, where format errors matter most")
    ap.add_argument("--distillkit-src", default="", help="a local DistillKit checkout: also measure its compressor")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip comparing the gradient formula with autograd on the first block")
    ap.add_argument("--block-tokens", type=int, default=1024,
                    help="padded tokens per forward block; rows of a block are processed as [rows, V] float64")
    ap.add_argument("--kdcache-draws", default="8",
                    help="kdcache caches at the smallest K with this many tail draws (comma list)")
    ap.add_argument("--real-llm", default="",
                    help="bench/real_llm.py's root (e.g. runs/real_llm): SmolLM2-135M-Instruct as the teacher, its "
                         "first 6 layers as the student, this machine's doc texts as the rows (built when missing)")
    ap.add_argument("--json", default="", help="write the raw numbers here")
    args = ap.parse_args()
    args.kdcache_draws = [int(x) for x in args.kdcache_draws.split(",") if x]
    if args.quick:
        args.rows = 2000
    if args.smoke:
        args.rows, args.root = 300, "runs/bench-smoke"
    args.ks = [int(x) for x in args.ks.split(",")]
    args.draws = [int(x) for x in args.draws.split(",") if x]
    args.students = [x for x in args.students.split(",") if x]
    args.temperatures = [float(x) for x in args.temperatures.split(",")]
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    keep_freed_memory()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(shlex.quote(x) for x in sys.argv)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if not args.distillkit_src:
        log("DistillKit's compressor: not installable from the package registry (no `distillkit` on PyPI); "
            "pass --distillkit-src DIR (a local checkout) to measure it too")
    if args.real_llm:
        b, paths, about = real_llm_bench(Path(args.real_llm))
        args.root = args.real_llm
    else:
        b = realtext.ensure(args.root, log=log, smoke=args.smoke)
        paths = {"teacher": b.teacher, "teacher_sharp": b.teacher_sharp}
        about = "the stdlib corpus, V = 16,384"
    work = Path(args.root) / "fidelity" / f"rows{args.rows}"
    ids, masks, n = subset_prepared(b, args.rows, work / "prepared")
    log(f"fidelity: {n:,} held-out target rows in {len(ids)} examples")
    results: dict[str, Any] = {"command": command, "date": date, "rows": n, "examples": len(ids),
                               "temperatures": args.temperatures, "teachers": {}}
    for name in (list(paths) if args.real_llm else args.teachers.split(",")):
        t0 = time.perf_counter()
        stats = realtext.heldout_stats(paths[name], ids, masks)
        res = run_teacher_formats(args, b, name, paths[name], ids, masks, work, log)
        results["teachers"][name] = {"stats": stats, **res, "seconds": time.perf_counter() - t0}
        log(f"fidelity: {name} done in {time.perf_counter() - t0:.0f}s")
    dk_note = ("DistillKit's compressor: run from the local checkout " + args.distillkit_src if args.distillkit_src else
               "DistillKit's compressor: not installable from the package registry (`pip download distillkit`: no "
               "matching distribution), so not measured; pass --distillkit-src DIR with a local checkout")
    text = (f"# Fidelity per byte ({date})\n\n`{command}`\n\n{n:,} held-out target rows of {about} "
            f"({len(ids)} examples); student: {b.student}. {dk_note}.\n" + markdown(results, args.temperatures))
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
