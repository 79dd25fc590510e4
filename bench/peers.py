"""Peer storage formats of teacher distributions, re-implemented for `bench/fidelity.py`.

    (imported by bench/fidelity.py; no command of its own)

Every format here does two things, the way its project does them (sources read, cited per class):
  1. `store(...)` writes its arrays to files the way the peer stores them (dtypes, container,
     compression), so `bytes / row` is a measured file size, not a formula;
  2. `decode(rows, T)` gives what the peer's KD loss uses at temperature T, as a `Decoded`: teacher
     masses on a per-row support of ids, plus the mass the loss puts on "everything else".

`Decoded` is the common currency: a format's forward-KL-style loss on it,
    L = -Σ_{i∈S} P_i log q^T_i - R log Q^T_rest,    q^T = softmax(z / T), Q^T_rest = 1 - Σ_{i∈S} q^T_i,
has the gradient w.r.t. the student's logits z
    ∂L/∂z = ((Σ_S P + R)·q^T - P·1_S - R·q^T·1_{∉S} / Q^T_rest) / T.
With R = 0 this is the cross-entropy of the full student softmax against P (top-K renormalised,
DistillKit's "zero", axolotl, sampled KD); with R = the tail it is K + 1 buckets (kdcache, Megatron's
ghost token). `bench/fidelity.py --check` compares this formula with autograd through each peer's loss
written out as the peer writes it.

Not copied from anywhere: each peer's behaviour is re-expressed here from reading its code.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NEG_INF = float("-inf")


@dataclass
class Decoded:
    """A format's teacher target at one temperature, for n rows.

    ids [n, M] int64 support (pads: any valid id, masked by `valid`), valid [n, M] bool,
    mass [n, M] float64 teacher mass the loss puts on each support id (0 on pads),
    tail [n] float64 mass the loss puts on the student's rest bucket (0: the format has no such bucket).
    """

    ids: torch.Tensor
    valid: torch.Tensor
    mass: torch.Tensor
    tail: torch.Tensor


def _sizes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _example_splits(row_counts: list[int]) -> np.ndarray:
    """Row offsets [E + 1] of consecutive examples."""
    return np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)


def _groups(row_counts: list[int], max_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive whole examples of at most `max_rows` rows (at least one example each).

    -> [(example_start, example_stop, row_start, row_stop)]. A writer that saves one blob per
    training step or per long sequence sees thousands of rows per blob; grouping our short
    (~25-target) examples the same way keeps per-blob container bytes out of the per-row figure.
    """
    offs = _example_splits(row_counts)
    out, e = [], 0
    while e < len(row_counts):
        f = e + 1
        while f < len(row_counts) and offs[f + 1] - offs[e] <= max_rows:
            f += 1
        out.append((e, f, int(offs[e]), int(offs[f])))
        e = f
    return out


# ---- top-K renormalised: DistillKit missing_probability_handling=zero, axolotl ------------------------

class TopKRenorm:
    """Teacher top-K log-probs, renormalised over the K ids, against the student's FULL softmax.

    Read: arcee-ai/DistillKit `distillkit/lossfuncs/common.py` (`get_target_logprobs`: with missing=ZERO
    the K log-probs are re-tempered as α·log p_i - logsumexp(α·log p_K), α = 1/T, i.e. renormalised over
    the K ids even at T = 1) and `lossfuncs/kl.py` (`sparse_kl_div_inner`: Σ_K P_i (log P_i - log q_i)
    with q the student's log-softmax over the whole vocabulary, missing ids contribute nothing);
    axolotl `src/axolotl/integrations/kd/chat_template.py` (top-K probs renormalised, raised to T1/T2 and
    renormalised again) and `kd/topk_logprob/forward_kl.py` (same sum, student logsumexp over the full
    vocabulary). So at every T the target is softmax(log p_K / T) on the K ids and 0 elsewhere.

    Storage: Parquet via pyarrow with its default compression (snappy; DistillKit's
    `StreamingParquetWriter` opens `pq.ParquetWriter` with defaults), one row per position with
    fixed-size lists: ids int32 and log-probs float32 (what vLLM / torch.topk return). Neither project
    pins one binary layout for raw top-K (axolotl keeps vLLM's JSON, DistillKit's raw rows are
    "token_ids"/"top_values"), so this is the compact reading of both.
    """

    name = "top-K renorm"

    def __init__(self, k: int):
        self.k = k

    def store(self, out: Path, ids: np.ndarray, logprobs: np.ndarray) -> int:
        """ids [n, K] int, logprobs [n, K] float32 -> bytes written under `out`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.mkdir(parents=True, exist_ok=True)
        n, k = ids.shape
        tbl = pa.table({
            "token_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int32).ravel()), k),
            "logprobs": pa.FixedSizeListArray.from_arrays(pa.array(logprobs.astype(np.float32).ravel()), k),
        })
        f = out / "data_0.parquet"
        pq.write_table(tbl, f)
        back = pq.read_table(f)
        assert np.array_equal(np.asarray(back["logprobs"].combine_chunks().flatten()), logprobs.astype(np.float32).ravel())
        return _sizes([f])

    @staticmethod
    def decode(ids: torch.Tensor, logprobs32: torch.Tensor, temperature: float) -> Decoded:
        """ids [n, K], logprobs32 [n, K] (the stored float32 values) -> target softmax(lp / T) on the K ids."""
        mass = torch.softmax(logprobs32.double() / temperature, dim=-1)
        return Decoded(ids, torch.ones_like(ids, dtype=torch.bool), mass, torch.zeros(len(ids), dtype=torch.float64))


# ---- top-K + ghost tail bucket: Megatron-LM offline KD ------------------------------------------------

class MegatronGhost:
    """Top-K log-probs (normalised over the full vocabulary) + one "ghost" bucket for the rest.

    Read: NVIDIA/Megatron-LM `megatron/training/distillation/logits_saver.py` (`LogitsSaverHooks`: top-K on
    fp32 logits, log-probs = logit - logsumexp over the full vocabulary, saved as `save_dtype` fp16 by
    default; ids as uint16 low bits + a torch.bool tensor for bit 17; per iteration one
    `torch.save({'values', 'indices_low', 'bit_17'})` blob, zstd level 3, members of a tar) and
    `cached_logits_loss.py` (`topk_kl_div(..., add_ghost_token=True)`: teacher residual
    log(clamp(1 - Σ exp(values), min=1e-8)), student residual log(clamp(1 - Σ q_K, 1e-8)), forward KL
    over the K + 1 entries with the student's full-vocabulary log-softmax). Megatron's cached-logits
    loss has no temperature; at T != 1 this bench re-tempers the K + 1 entries as one distribution,
    (p_i^β, r^β) / Σ, which is the only tail rule at T != 1 any peer implements (DistillKit's
    `symmetric_uniform` in `lossfuncs/common.py`: `leftover.pow(alpha)`).
    NVIDIA/NeMo-Aligner's `use_k_add_1_logits` (K + 1 buckets from stored logits + logsumexp) is the same
    idea but is commented out ("TODO: add support") in `megatron_gpt_knowledge_distillation.py`; its
    implemented loss renormalises BOTH teacher and student over the K ids (`_TopKLogitsCrossEntropy`).
    """

    name = "top-K + ghost"
    ROWS_PER_MEMBER = 4096  # rows per torch.save blob ("iteration"); the saver writes one per step

    def __init__(self, k: int):
        self.k = k

    @staticmethod
    def quantise(logprobs32: torch.Tensor) -> torch.Tensor:
        """The fp16 values the saver writes (cast of the fp32 log-probs)."""
        return logprobs32.to(torch.float16)

    def store(self, out: Path, ids: np.ndarray, values16: np.ndarray, row_counts: list[int]) -> int:
        """ids [n, K], values16 [n, K] float16 -> one tar of zstd(torch.save) blobs; bytes written."""
        from numcodecs import Zstd

        out.mkdir(parents=True, exist_ok=True)
        z = Zstd(level=3)
        path = out / "dp0__0.tar"
        meta = json.dumps({"saver": {"k": self.k, "save_dtype": "fp16"}}).encode()
        ids64 = torch.as_tensor(ids.astype(np.int64))
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("_meta.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
            # One blob per "iteration": the saver stacks a step's micro-batches into one [seq, batch, K]
            # tensor per field; here a group of whole examples is one [rows, K] tensor per field.
            for member, (_, _, a, b) in enumerate(_groups(row_counts, self.ROWS_PER_MEMBER)):
                buf = io.BytesIO()
                torch.save({"values": [torch.as_tensor(values16[a:b])],
                            "indices_low": [(ids64[a:b] & 0xFFFF).to(torch.uint16)],
                            "bit_17": [(ids64[a:b] >> 16).to(torch.bool)]}, buf)
                data = z.encode(buf.getvalue())
                info = tarfile.TarInfo(f"{member}.pt.zst")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(bytes(data)))
        return _sizes([path])

    @staticmethod
    def decode(ids: torch.Tensor, values16: torch.Tensor, temperature: float) -> Decoded:
        lp = values16.double()
        resid = (1.0 - lp.exp().sum(-1)).clamp(min=1e-8)  # Megatron's teacher residual, clamped at 1e-8
        if temperature == 1.0:
            mass, tail = lp.exp(), resid
        else:
            both = torch.cat([lp, resid.log()[:, None]], dim=1) / temperature
            w = torch.softmax(both, dim=-1)
            mass, tail = w[:, :-1], w[:, -1]
        return Decoded(ids, torch.ones_like(ids, dtype=torch.bool), mass, tail)


# ---- random-sampling KD: Anshumann et al. (ACL 2025), SampledKD's cache ---------------------------------

class SampledKD:
    """N draws with replacement from the teacher at the KD temperature, kept as (id, count).

    Read: almogtavor/sampled-knowledge-distillation `sampledkd/training/offline_cache.py`
    (`sample_with_replacement_from_logits`: Gumbel-max draws from softmax(logits / τ) with τ the KD
    temperature; `topU_unique_counts_per_row`; `counts_to_q7`: counts / N on a 7-bit grid summing to
    127, rounding residue given to the largest residuals; `pack_id_q7`: 17-bit id | q7 << 17 in 3 bytes,
    U slots per position, pads = id V with q 0; items `torch.save`d per shard) and the distiller's cached
    path (`decode_ids_probs_from_block`: probs = q7 / Σ q7; loss -Σ probs · log_softmax(student)[ids]
    over the full student softmax). Anshumann et al. (arXiv 2503.16870) sample from a proposal and
    importance-weight by p / proposal; with the teacher at the KD temperature as the proposal the
    weights are all 1 and the target is counts / N, which is what the cache holds.
    Because the draws are taken at the KD temperature, one cache serves one temperature: at each T this
    bench draws from p^T (a separate cache per T; bytes are measured per T). Draws: N = U (12 or 24),
    seeded per (teacher, T, N). Container: `torch.save` of a list of items, as SampledKD's shards.
    """

    name = "sampled KD"
    PROB_BITS, ID_BITS = 7, 17
    QMAX = (1 << PROB_BITS) - 1

    def __init__(self, draws: int):
        self.draws = draws

    def sample(self, p: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """p [n, V] float64 (= p^T) -> ids [n, N] (distinct ids first, pads = -1), q7 [n, N] uint8 codes."""
        draws = torch.multinomial(p, self.draws, replacement=True, generator=gen)  # [n, N]
        s = draws.sort(dim=1).values
        first = torch.ones_like(s, dtype=torch.bool)
        first[:, 1:] = s[:, 1:] != s[:, :-1]
        counts = (s[:, :, None] == s[:, None, :]).sum(-1)  # [n, N] count of each entry's id
        counts = torch.where(first, counts, torch.zeros_like(counts))
        # Distinct ids to the front (stable by id), pads after.
        order = torch.argsort((~first).to(torch.int8), dim=1, stable=True)
        ids = torch.where(first, s, torch.full_like(s, -1)).gather(1, order)
        counts = counts.gather(1, order)
        return ids, self.to_q7(counts)

    def to_q7(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [n, N] -> 7-bit codes summing to 127 per row (largest-remainder fix-up, as `counts_to_q7`)."""
        x = counts.double() / self.draws * self.QMAX
        q = torch.round(x)
        live = counts > 0
        diff = (self.QMAX - q.sum(-1)).long()  # [n]
        resid = torch.where(live, (x - q).abs(), torch.full_like(x, -1.0))
        rank = torch.argsort(torch.argsort(resid, dim=1, descending=True, stable=True), dim=1)
        fix = live & (rank < diff.abs()[:, None])
        q = (q + fix * diff.sign()[:, None]).clamp(0, self.QMAX)
        return q.to(torch.uint8)

    def store(self, out: Path, ids: torch.Tensor, q7: torch.Tensor, row_counts: list[int], vocab: int) -> int:
        """Pack U = N slots of 3 bytes per row; one torch.save'd list of per-example items."""
        out.mkdir(parents=True, exist_ok=True)
        sid = torch.where(ids >= 0, ids, torch.full_like(ids, vocab)).long()
        x = (sid & ((1 << self.ID_BITS) - 1)) | (q7.long() << self.ID_BITS)
        packed = torch.stack([x & 0xFF, (x >> 8) & 0xFF, (x >> 16) & 0xFF], dim=-1).to(torch.uint8)  # [n, U, 3]
        # SampledKD saves one item per sequence; our examples are short, so an item here is a group of
        # whole examples of up to 4,096 rows (what one long sequence would be), see `_groups`.
        items = [{"rs": {"U": self.draws, "sentinel_id": vocab, "packed": packed[a:b].reshape(-1).clone()},
                  "valid_mask": torch.ones(b - a, dtype=torch.bool)}
                 for _, _, a, b in _groups(row_counts, 4096)]
        f = out / "shard_000000.pt"
        torch.save(items, f)
        return _sizes([f])

    @staticmethod
    def decode(ids: torch.Tensor, q7: torch.Tensor) -> Decoded:
        valid = (ids >= 0) & (q7 > 0)
        w = torch.where(valid, q7.double(), torch.zeros_like(q7, dtype=torch.float64))
        mass = w / w.sum(-1, keepdim=True)
        safe = torch.where(ids >= 0, ids, torch.zeros_like(ids))
        return Decoded(safe, valid, mass, torch.zeros(len(ids), dtype=torch.float64))


# ---- DistillKit's logit compressor (optional: not installable from the package registry) -------------------

class DistillKitCompressor:
    """DistillKit's `LogprobCompressor` run from a local checkout (`--distillkit-src DIR`).

    DistillKit is not on PyPI (`pip download distillkit` finds nothing), so the committed bench cannot
    depend on it; given a checkout, this imports `distillkit.compression` from it at run time (nothing
    of it is copied here). Config: the README's "recommended configuration" (k = 128, exact_k = 16
    bfloat16, polynomial terms [0, 1, 2, 3, 4, sqrt] in float32, no residual bins, no delta encoding,
    no error diffusion) and its "budget pick" (k = 50, exact_k = 1, terms [0, 1, sqrt]). Storage: the
    Parquet schema of `distillkit/sample_common.py` `compressed_logit_schema` (per sequence:
    list<list<uint8>> compressed_logprobs and bytepacked_indices; input_ids left out, as for every
    format here), pyarrow's default compression. Loss: `missing_probability_handling: zero`, as in the
    README's example, i.e. the decoded K log-probs renormalised (`TopKRenorm.decode`).
    """

    name = "DistillKit compressor"
    PRESETS = {
        "recommended": dict(k=128, exact_k=16, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, 3, 4, "sqrt"],
                            term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
        "budget": dict(k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"],
                       term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
    }

    def __init__(self, src: str, preset: str, vocab: int):
        import sys

        if src not in sys.path:
            sys.path.insert(0, src)
        from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

        self.preset = preset
        self.cfg = DistributionQuantizationConfig(d=vocab, **self.PRESETS[preset])
        self.k = self.cfg.k
        self.comp = LogprobCompressor(config=self.cfg)

    def roundtrip(self, ids: torch.Tensor, logprobs32: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """ids [n, k], logprobs32 [n, k] -> (stored byte arrays, decoded ids [n, k], decoded log-probs [n, k])."""
        enc = self.comp.compress_from_sparse(ids[None], logprobs32.float()[None])
        dec_ids, dec_lp = self.comp.decompress_to_sparse({k: v for k, v in enc.items()})
        return ({k: v[0].cpu().numpy() for k, v in enc.items()}, dec_ids[0].long(), dec_lp[0].double())

    @staticmethod
    def store(out: Path, enc_parts: list[dict], row_counts: list[int]) -> int:
        """enc_parts: per block {compressed_logprobs [n, a] uint8, bytepacked_indices [n, b] uint8}."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.mkdir(parents=True, exist_ok=True)
        lp = np.concatenate([e["compressed_logprobs"] for e in enc_parts])
        ix = np.concatenate([e["bytepacked_indices"] for e in enc_parts])
        offs = _example_splits(row_counts)
        seq_lp = [[r.tolist() for r in lp[a:b]] for a, b in zip(offs[:-1], offs[1:])]
        seq_ix = [[r.tolist() for r in ix[a:b]] for a, b in zip(offs[:-1], offs[1:])]
        schema = pa.schema([pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                            pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
        f = out / "data_0.parquet"
        pq.write_table(pa.table({"compressed_logprobs": seq_lp, "bytepacked_indices": seq_ix}, schema=schema), f)
        return _sizes([f])
