"""Summaries of a teacher cache for `kdcache inspect`: size per row against the budget, teacher
entropy and top-K mass statistics, shard status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.cache.reader import Cache
from pipeline.errors import KdError


@dataclass
class InspectConfig:
    """Settings of `kdcache inspect`."""

    cache: str = ""
    verify: bool = False  # read every shard: checksums and completeness
    sample_rows: int = 200_000  # rows read for the entropy / top-K mass statistics

    def __post_init__(self) -> None:
        if self.sample_rows < 1:
            raise KdError(f"sample_rows must be at least 1, got {self.sample_rows}")


def inspect_cache(cfg: InspectConfig) -> dict[str, Any]:
    """`summarize` of the cache at `cfg.cache` (see `verify_cache` for --verify)."""
    from pipeline.cache import open_cache

    if not cfg.cache:
        raise KdError("no cache given (kdcache inspect CACHE)")
    return summarize(open_cache(cfg.cache), cfg.sample_rows)


def verify_cache(path: str, on_shard: Callable[[int], None] | None = None) -> list[str]:
    """Read every shard of the cache at `path`; one line per problem (checksums, completeness)."""
    from pipeline.cache import open_cache

    return open_cache(path).verify(on_shard=on_shard)


def size_budget(k: int, vocab_size: int) -> float:
    """Bytes per row the format promises with default settings: 3K + 16 (3.5K + 16 above 65,536 ids)."""
    return (3.0 if vocab_size <= 65536 else 3.5) * k + 16


def summarize(c: Cache, sample_rows: int = 200_000) -> dict[str, Any]:
    """Cache statistics; entropy and top-K mass come from up to `sample_rows` rows spread over the
    committed shards (each shard contributes its leading rows)."""
    committed = c.committed()
    ent: list[np.ndarray] = []
    mass: list[np.ndarray] = []
    nbytes = c.bytes_on_disk()
    out: dict[str, Any] = {
        "path": str(c.path), "rows": c.num_rows, "examples": int(c.meta["num_examples"]), "k": c.k,
        "vocab_size": c.vocab_size, "temperatures": c.temperatures, "tail_samples": c.tail_samples,
        "teacher": c.meta["teacher"]["model"], "shards": len(committed), "committed": int(sum(committed)),
        "bytes": nbytes, "bytes_per_row": nbytes / max(c.num_rows, 1), "budget_per_row": size_budget(c.k, c.vocab_size),
    }
    done = [i for i, ok in enumerate(committed) if ok]
    if done:
        per = max(1, sample_rows // len(done))
        unreadable = []
        for i in done:
            s = c.shards[i]
            try:
                rows = c.read(s["row_start"], min(s["row_stop"], s["row_start"] + per))
            except KdError as err:  # a damaged shard must not hide the others (--verify lists them all)
                unreadable.append(str(err))
                continue
            ent.append(rows["entropy"])
            mass.append(np.exp(rows["topk_logprobs"].astype(np.float64)).sum(-1))
        out["unreadable"] = unreadable
    if ent:
        e, m = np.concatenate(ent), np.concatenate(mass)
        out["entropy"] = {"mean": float(e.mean()), "p50": float(np.median(e)), "p90": float(np.quantile(e, 0.9))}
        out["topk_mass"] = {"mean": float(m.mean()), "p10": float(np.quantile(m, 0.1)), "p50": float(np.median(m))}
        out["sampled_rows"] = int(len(e))
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable lines of `summarize`'s dict."""
    lines = [
        f"cache        {s['path']}",
        f"teacher      {s['teacher']}",
        f"rows         {s['rows']:,} target positions over {s['examples']:,} examples",
        f"support      K={s['k']}  vocabulary={s['vocab_size']:,}  temperatures={s['temperatures']}"
        + (f"  tail samples={s['tail_samples']}" if s["tail_samples"] else ""),
        f"size         {s['bytes']:,} bytes = {s['bytes_per_row']:.1f} bytes/row "
        f"(budget {s['budget_per_row']:.0f}: {'within' if s['bytes_per_row'] <= s['budget_per_row'] else 'OVER'})",
        f"shards       {s['committed']}/{s['shards']} committed",
    ]
    if "entropy" in s:
        e, m = s["entropy"], s["topk_mass"]
        lines.append(f"entropy      mean {e['mean']:.3f}  median {e['p50']:.3f}  p90 {e['p90']:.3f} nats "
                     f"({s['sampled_rows']:,} rows)")
        lines.append(f"top-K mass   mean {m['mean']:.4f}  p10 {m['p10']:.4f}  median {m['p50']:.4f}")
    for u in s.get("unreadable", []):
        lines.append(f"unreadable   {u}")
    return "\n".join(lines)
