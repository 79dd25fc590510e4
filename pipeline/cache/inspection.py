"""Summaries of a teacher cache for `kdcache inspect`: bytes per row in all and per stored array,
teacher entropy and tail-mass statistics, shard status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from pipeline.cache.reader import Cache
from pipeline.errors import KdError


@dataclass
class InspectConfig:
    """Settings of `kdcache inspect`."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("cache",)  # may be an fsspec URL (pipeline.storage)

    cache: str = ""
    verify: bool = False  # read every shard: checksums and completeness
    sample_rows: int = 200_000  # rows read for the entropy / top-K mass statistics

    def __post_init__(self) -> None:
        if self.sample_rows < 1:
            raise KdError(f"sample_rows must be at least 1, got {self.sample_rows}")


def inspect_cache(cfg: InspectConfig) -> dict[str, Any]:
    """`summarize` of the cache at `cfg.cache` (see `verify_cache` for --verify). With `cfg.verify`, damaged
    metadata does not stop the summary (verify lists it); without, it is a one-line error naming the file."""
    from pipeline.cache import open_cache

    if not cfg.cache:
        raise KdError("no cache given (kdcache inspect CACHE)")
    return summarize(open_cache(cfg.cache, strict=not cfg.verify), cfg.sample_rows)


def verify_cache(path: str, on_shard: Callable[[int], None] | None = None) -> list[str]:
    """Read and check every file of the cache at `path` (`Cache.verify`); one line per problem. The output's
    ownership records (`.kdcache/`) are checked by `pipeline.ownership.check_records`."""
    from pipeline.cache import open_cache

    return open_cache(path, strict=False).verify(on_shard=on_shard)


def summarize(c: Cache, sample_rows: int = 200_000) -> dict[str, Any]:
    """Cache statistics; entropy and tail mass come from up to `sample_rows` rows spread over the
    committed shards (each shard contributes its leading rows). Bytes are exact: every file on disk,
    and per array the sizes the shards' commit records hold."""
    committed = c.committed()
    ent: list[np.ndarray] = []
    log_r: list[np.ndarray] = []
    nbytes = c.bytes_on_disk()
    rows = max(c.num_rows, 1)
    done_rows = sum(s["row_stop"] - s["row_start"] for s, ok in zip(c.shards, committed) if ok)
    out: dict[str, Any] = {
        "path": c.where, "local_copy": str(c.path) if c.mirror is not None else None,
        "data": str((c.meta.get("data") or {}).get("path", "")), "rows": c.num_rows, "examples": int(c.meta["num_examples"]), "k": c.k,
        "vocab_size": c.vocab_size, "temperatures": c.temperatures, "tail_samples": c.tail_samples,
        "codec": c.meta["codec"], "teacher": c.meta["teacher"]["model"], "shards": len(committed),
        "committed": int(sum(committed)), "bytes": nbytes, "bytes_per_row": nbytes / rows,
        "checksummed": c.checksummed,
        "array_bytes_per_row": {k: v / max(done_rows, 1) for k, v in c.array_bytes().items()},
    }
    done = [i for i, ok in enumerate(committed) if ok]
    if done:
        per = max(1, sample_rows // len(done))
        unreadable = []
        for i in done:
            s = c.shards[i]
            try:
                part = c.read(s["row_start"], min(s["row_stop"], s["row_start"] + per), ("entropy", "tail_logprob"))
            except KdError as err:  # a damaged shard must not hide the others (--verify lists them all)
                unreadable.append(str(err))
                continue
            ent.append(part["entropy"])
            log_r.append(part["tail_logprob"])
        out["unreadable"] = unreadable
    if ent:
        e, lr = np.concatenate(ent).astype(np.float64), np.concatenate(log_r).astype(np.float64)
        mass = -np.expm1(lr)  # top-K mass = 1 - r, exact from the stored tail
        out["entropy"] = {"mean": float(e.mean()), "p50": float(np.median(e)), "p90": float(np.quantile(e, 0.9))}
        out["topk_mass"] = {"mean": float(mass.mean()), "p10": float(np.quantile(mass, 0.1)),
                            "p50": float(np.median(mass))}
        finite = lr[np.isfinite(lr)]
        out["tail_mass"] = {"p50": float(np.exp(np.median(finite))) if len(finite) else 0.0,
                            "below_1e-8": float(np.mean(lr < np.log(1e-8)))}
        out["sampled_rows"] = int(len(e))
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable lines of `summarize`'s dict."""
    codec = s["codec"]
    lines = [
        f"cache        {s['path']}" + (f"  (local copy {s['local_copy']})" if s.get("local_copy") else ""),
        f"data         {s['data']}",
        f"teacher      {s['teacher']}",
        f"rows         {s['rows']:,} target positions over {s['examples']:,} examples",
        f"support      K={s['k']}  vocabulary={s['vocab_size']:,}  temperatures={s['temperatures']}"
        + (f"  tail samples={s['tail_samples']}" if s["tail_samples"] else ""),
        f"codec        {codec['name']}: head step {codec['head_step']:g} nats, tail split step "
        f"{codec['tail_step']:g}, tail entropy {codec['entropy_bits']} bits, tail shape {codec['shape_bits']} bits",
        f"size         {s['bytes']:,} bytes = {s['bytes_per_row']:.2f} bytes/row (all files)",
        "per array    " + "  ".join(f"{k} {v:.2f}" for k, v in s["array_bytes_per_row"].items()) + "  (bytes/row)",
        f"shards       {s['committed']}/{s['shards']} committed",
    ]
    if not s.get("checksummed", True):
        lines.append("metadata     no checksums: written before kdcache.sha256 existed (shards are checksummed; "
                     "kdcache.json, index.parquet and config.yaml are only parsed)")
    if "entropy" in s:
        e, m, t = s["entropy"], s["topk_mass"], s["tail_mass"]
        lines.append(f"entropy      mean {e['mean']:.3f}  median {e['p50']:.3f}  p90 {e['p90']:.3f} nats "
                     f"({s['sampled_rows']:,} rows)")
        lines.append(f"top-K mass   mean {m['mean']:.4f}  p10 {m['p10']:.4f}  median {m['p50']:.4f}  "
                     f"(tail mass median {t['p50']:.2e}; {100 * t['below_1e-8']:.1f}% of rows below 1e-8)")
    for u in s.get("unreadable", []):
        lines.append(f"unreadable   {u}")
    return "\n".join(lines)
