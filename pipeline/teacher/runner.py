"""Stage 1: run a teacher once over prepared data and write the cache, shard by shard.

    kdcache teacher --data runs/demo/prepared --model runs/demo/teacher/final --out runs/demo/cache

The work is planned up front: the prepared data's `loss_mask` gives every example's row count, so
shards (contiguous example ranges of about `shard_rows` rows) and their row ranges are fixed
before the model loads. A shard is committed by an atomic rename; a re-run skips committed shards
and redoes the rest, so `kill -9` at any moment is recovered by running the same command again.
Execution modes: one process; `workers=N` local Dask processes; `scheduler=ADDRESS` an existing
Dask cluster (e.g. dask-jobqueue on Slurm); under `torchrun`, ranks take shards round-robin.
A teacher larger than one GPU: `parallel=tp` under torchrun (transformers' tensor-parallel plan over the
group's GPUs; the head gathered once for full-vocabulary statistics; rank 0 commits) or
`parallel=device_map` (its layers spread over one process's GPUs; e.g. one Dask worker per node). Several
such replicas split the shards as independent launches with `replica=r replicas=R` (configs/teacher-llama3.1-70b.yaml).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, TYPE_CHECKING

import numpy as np

from pipeline.cache import layout
from pipeline.cache.rows import target_counts
from pipeline.cache.schema import FORMAT_VERSION
from pipeline.cache.layout import read_meta
from pipeline.cache.writer import CacheWriter
from pipeline.config import to_dict
from pipeline.errors import Change, KdError, StaleOutput
from pipeline.identity import weights_hash
from pipeline.losses.temperature import DEFAULT_GRID_TEMPERATURES
from pipeline.ownership import LOCK_FILENAME, STATE_DIR, TEACHER, Output, claim
from pipeline.storage import is_url, storage_options, store_for

if TYPE_CHECKING:
    from pipeline.cache.schema import CodecParams
    from pipeline.teacher.worker import ShardJob

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """Settings of `kdcache teacher`."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("out", "data", "model")  # may be an fsspec URL (pipeline.storage)

    data: str = ""  # a `kdcache prepare` output directory
    model: str = ""  # local directory or hub id of any causal LM
    out: str = ""
    revision: str = ""  # hub revision to pin (recorded in the cache)
    preset: str = "default"  # codec preset (pipeline/cache/schema.py PRESETS): default | compact | hifi
    top_k: int = 0  # cached support K; 0 = the preset's
    head_step: float = 0.0  # nats per head-gap code; 0 = the preset's
    shape_bits: int = 0  # bits per tail temperature statistic; 0 = the preset's
    entropy_bits: int = 0  # bits of the tail entropy; 0 = the preset's
    temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_GRID_TEMPERATURES))
    tail_samples: int = -1  # S draws outside the top-K per row (methods.md §2); -1 = the preset's; 0 = off
    batch_tokens: int = 8192  # padded tokens per forward pass
    shard_rows: int = 65536  # target rows per shard: the unit of work and restart
    chunk_rows: int = 8192  # rows per Zarr chunk (the student reads whole chunks)
    head_chunk_rows: int = 0  # rows per output-head chunk; 0 = auto from the vocabulary size
    device: str = "auto"
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    workers: int = 0  # >0: a local Dask cluster of that many worker processes
    scheduler: str = ""  # address of an existing Dask scheduler
    threads: int = 0  # torch threads per process; 0 = all cores (one process) or cores // workers (local Dask)
    parallel: str = "none"  # none | tp (tensor parallel over torchrun's ranks) | device_map (layers over this process's GPUs)
    # torch.compile the statistics: always | never | auto. auto is the eager path on every device (the one the
    # tests exercise) until bench/gpu_suite.py (part teacher: compile off and on, on a GPU) shows compile pays.
    compile: str = "auto"
    replica: int = 0  # this run computes the shards with index % replicas == replica (independent launches)
    replicas: int = 1
    seed: int = 0
    clevel: int = 9
    overwrite: bool = False

    def __post_init__(self) -> None:
        from pipeline.cache.schema import PRESETS
        from pipeline.models import resolve_model_path

        if not is_url(self.model):  # a URL stays one (recorded as given; each machine loads its own local copy)
            self.model = resolve_model_path(self.model)  # a training run directory: its final/ model, as eval takes it
        if self.preset not in PRESETS:
            raise KdError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.top_k < 0 or self.head_step < 0 or self.shape_bits < 0 or self.entropy_bits < 0:
            raise KdError("top_k, head_step, shape_bits and entropy_bits must be >= 0 (0 = the preset's)")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise KdError(f"temperatures must be positive, got {self.temperatures}")
        self.temperatures = [float(t) for t in self.temperatures]
        for name in ("batch_tokens", "shard_rows", "chunk_rows"):
            if getattr(self, name) < 1:
                raise KdError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tail_samples < -1 or self.tail_samples > 65535:
            raise KdError(f"tail_samples must be in [0, 65535] (-1: the preset's), got {self.tail_samples}")
        if self.workers and self.scheduler:
            raise KdError("give either workers or scheduler, not both")
        if self.workers < 0 or self.threads < 0:
            raise KdError(f"workers and threads must be >= 0, got {self.workers} and {self.threads}")
        from pipeline.models import PARALLEL

        if self.parallel not in PARALLEL:
            raise KdError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.compile not in ("auto", "always", "never"):
            raise KdError(f"compile must be auto, always or never, got {self.compile!r}")
        if not 0 <= self.replica < self.replicas:
            raise KdError(f"replica must lie in [0, replicas = {self.replicas}), got {self.replica}")
        if self.parallel == "tp" and (self.workers or self.scheduler):
            raise KdError("--parallel tp runs under torchrun (one process per GPU of the group), not on Dask workers")

    def codec_params(self, vocab_size: int) -> "CodecParams":
        """The row codec's parameters: the preset, with any explicitly set value on top. The preset's tail draws
        are dropped when the head is the whole vocabulary (K = V: no tail to draw from); asked for explicitly,
        that is an error (`run_teacher`)."""
        from pipeline.cache.schema import PRESET_TAIL_SAMPLES, PRESETS, CodecParams

        chosen = dict(PRESETS[self.preset])
        for key in ("top_k", "head_step", "shape_bits", "entropy_bits"):
            if getattr(self, key):
                chosen[key] = getattr(self, key)
        draws = self.tail_samples
        if draws < 0:
            draws = PRESET_TAIL_SAMPLES[self.preset] if chosen["top_k"] < vocab_size else 0
        return CodecParams(vocab_size=vocab_size, temperatures=tuple(self.temperatures),
                           tail_samples=draws, clevel=self.clevel, **chosen)

    def identity(self) -> dict[str, Any]:
        """Settings that change the cache's bytes (not where or how many processes compute it)."""
        d = to_dict(self)
        # head_chunk_rows and threads change neither values nor draws (checked bitwise in tests); parallelism
        # changes float summation order only (tests/teacher/test_teacher_parallel.py bounds it).
        for k in ("out", "workers", "scheduler", "threads", "overwrite", "device", "head_chunk_rows", "parallel",
                  "replica", "replicas", "compile"):
            d.pop(k)
        return d


def resume_hint(cfg: TeacherConfig, diff: list[Change]) -> str:
    """What resumes a cache made with the default preset of before 2026-12-07 (K = 8 unless set, no tail draws
    unless asked for, today's `compact` precisions): `--preset compact`, which is that preset under its new name."""
    if cfg.preset != "default":
        return ""
    changed = {c.key: c for c in diff if isinstance(c, Change)}
    k, draws = changed.get("top_k"), changed.get("tail_samples")
    if (k is not None and (k.old, k.new) == (8, 6) and not cfg.top_k) or \
            (cfg.tail_samples == -1 and draws is not None and draws.old == 0):
        return ("it looks made with the default preset of before 2026-12-07 (K = 8 unless set, no tail draws): add "
                "--preset compact to resume it, or ")
    return ""


def plan_shards(row_counts: np.ndarray, shard_rows: int) -> list[dict[str, int]]:
    """Split examples into contiguous shards of about `shard_rows` target rows each."""
    shards, start, rows, row0 = [], 0, 0, 0
    for e, c in enumerate(row_counts.tolist()):
        rows += c
        if rows >= shard_rows:
            shards.append({"index": len(shards), "example_start": start, "example_stop": e + 1,
                           "row_start": row0, "row_stop": row0 + rows})
            start, row0, rows = e + 1, row0 + rows, 0
    if start < len(row_counts):
        shards.append({"index": len(shards), "example_start": start, "example_stop": len(row_counts),
                       "row_start": row0, "row_stop": row0 + rows})
    return shards


def teacher_identity(cfg: TeacherConfig) -> dict[str, Any]:
    """Model id/path, revision, weights hash, dtype and vocabulary of the teacher (config only: no weights loaded)."""
    from transformers import AutoConfig

    from pipeline.models import check_gguf, gguf_error, is_gguf, local_model

    local = Path(local_model(cfg.model)).expanduser()  # a run at a URL: this machine's checked copy of its final/
    if is_gguf(cfg.model):  # the config is read from the file's metadata
        gguf = check_gguf("model", cfg.model, model=True)
        try:
            mc = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # noqa: BLE001 -- a damaged file fails in the reader with any error type
            raise gguf_error("model config", cfg.model, e) from None
    else:
        try:
            mc = AutoConfig.from_pretrained(str(local) if local.exists() else cfg.model, revision=cfg.revision or None)
        except (OSError, ValueError, KeyError) as e:
            raise KdError(f"cannot load model config {cfg.model!r}: {str(e).splitlines()[0]}") from None
    from pipeline.models import context_length

    class _M:  # context_length reads .config only
        config = mc

    architectures = getattr(mc, "architectures", None)
    if not architectures and is_gguf(cfg.model):  # a GGUF's config names its model type only
        from transformers.models.auto import modeling_auto

        name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mc.model_type)
        architectures = [name] if name else None

    # The dtype is recorded as asked ("auto" included): it is resolved by each process that computes a
    # shard (a planning host without a GPU would resolve "auto" to float32 while GPU workers run bf16),
    # and every shard's commit record holds the dtype it was actually computed in.
    return {"model": cfg.model, "revision": cfg.revision or getattr(mc, "_commit_hash", None),
            # a directory: over its weight files; a .gguf file: the file's sha256
            "weights_sha256": weights_hash(local) if local.exists() else None, "dtype": cfg.dtype,
            "architectures": architectures, "model_vocab_size": int(mc.vocab_size),
            "context_length": context_length(_M)}


def local_model_dir(model: str) -> Path | None:
    """The model's local directory (or `.gguf` file, which carries its tokenizer; for a run at a URL, this
    machine's copy of its final/), or None for a hub id."""
    from pipeline.models import is_gguf, local_model

    p = Path(local_model(model)).expanduser()
    return p if p.is_dir() or (is_gguf(p) and p.is_file()) else None


def check_model_tokenizer(model: str, local: Path | None, data_tok: dict[str, Any], model_vocab: int) -> None:
    """Refuse data prepared with another tokenizer than the teacher's.

    A model directory with tokenizer files must hold the very tokenizer the data was prepared with
    (same sha256 of every (token, id) pair). Without one, the model's head may exceed the tokenizer's
    vocabulary only by padding (Qwen pads 151,665 ids to 151,936): more than max(128, V/50) extra rows
    means the data was tokenized for another model.
    """
    from pipeline.identity import same_tokenizer, tokenizer_identity
    from pipeline.models import has_tokenizer_files, load_tokenizer

    v = int(data_tok["vocab_size"])
    if local is not None and has_tokenizer_files(local):
        own = tokenizer_identity(load_tokenizer(str(local)), str(local))
        if not same_tokenizer(own, data_tok):
            raise KdError(f"the data was prepared with tokenizer {data_tok['name']} ({data_tok['vocab_size']} ids, "
                          f"sha256 {data_tok['vocab_sha256'][:12]}) but model {model} has its own tokenizer "
                          f"({own['vocab_size']} ids, sha256 {own['vocab_sha256'][:12]}); prepare the data with "
                          f"--tokenizer {model}")
        return
    if model_vocab - v > max(128, v // 50):
        raise KdError(f"model {model} has {model_vocab} output ids but the data's tokenizer {data_tok['name']} has {v}: "
                      "more than padding apart; the data was prepared with another model's tokenizer")


def build_meta(cfg: TeacherConfig) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Check inputs and plan the cache. Returns (metadata, row counts per example, dataset)."""
    from pipeline.data.prepare import load_prepared, prepared_meta

    pmeta = prepared_meta(cfg.data)
    ds = load_prepared(cfg.data)
    counts, lengths = target_counts(ds)
    if len(counts) == 0 or counts.sum() == 0:
        raise KdError(f"{cfg.data} has no target positions: nothing to cache")
    tid = teacher_identity(cfg)
    tok_vocab = int(pmeta["tokenizer"]["vocab_size"])
    if tid["model_vocab_size"] < tok_vocab:
        raise KdError(f"model {cfg.model} has {tid['model_vocab_size']} output ids but the tokenizer has {tok_vocab}: "
                      "the model cannot score every token (wrong tokenizer?)")
    ctx = tid["context_length"]
    if ctx is not None and lengths.max() > ctx:
        e = int(np.argmax(lengths > ctx))
        raise KdError(f"example {e} has {int(lengths[e])} tokens, longer than the model's context of {ctx}; "
                      f"re-run `kdcache prepare` with --max-length {ctx}")
    check_model_tokenizer(cfg.model, local_model_dir(cfg.model), pmeta["tokenizer"], tid["model_vocab_size"])
    params = cfg.codec_params(tok_vocab)
    if cfg.tail_samples > 0 and params.top_k >= tok_vocab:
        raise KdError(f"tail_samples needs ids outside the top-K, but top_k {params.top_k} covers the whole vocabulary")
    masked = tid["model_vocab_size"] - tok_vocab
    if masked:
        log.info("model %s has %d output ids beyond the tokenizer's %d (padding): they are masked out",
                 cfg.model, masked, tok_vocab)
    shards = plan_shards(counts, cfg.shard_rows)
    meta = {
        "kind": "kdcache-teacher-cache", "format_version": FORMAT_VERSION,
        "codec": params.to_meta(), "num_rows": int(counts.sum()), "num_examples": len(counts),
        "chunk_rows": cfg.chunk_rows,
        # Ids >= the tokenizer's V exist in the model's head but not in the tokenizer: excluded from every
        # distribution (log p renormalised over the tokenizer's ids).
        "masked_model_ids": masked,
        "teacher": tid, "tokenizer": pmeta["tokenizer"],
        "data": {"path": cfg.data if is_url(cfg.data) else str(Path(cfg.data).resolve()),
                 "fingerprint": pmeta["fingerprint"]},
        "config_identity": cfg.identity(), "shards": shards,
    }
    return meta, counts, ds


def teacher_claim(cfg: TeacherConfig) -> Any:
    """The teacher's hold on its cache directory (`pipeline.ownership.claim`). One launch holds lock.json;
    replica launches (`--replica r --replicas R`) each hold lock.replica-r.json, so several replicas run
    together while a second launch of the same index, one with another replica count, or a plain launch
    beside replicas is refused. On an object store the same rules hold for lease objects
    (`pipeline.storage.lease.Lease`: .kdcache/lease.json, lease.replica-r.json)."""
    if is_url(cfg.out):
        from pipeline.storage.lease import Lease

        if cfg.replicas == 1:
            return Lease(cfg.out, "teacher", conflicts=lambda name, holder: name.startswith("lease.replica-"))
        return Lease(cfg.out, "teacher", f"lease.replica-{cfg.replica}.json", {"replica": cfg.replica, "replicas": cfg.replicas},
                     conflicts=lambda name, holder: name == "lease.json" or (
                         name.startswith("lease.replica-") and holder.get("replicas") != cfg.replicas))
    if cfg.replicas == 1:
        return claim(cfg.out, TEACHER, conflicts=lambda name, holder: name.startswith("lock.replica-"))
    return claim(cfg.out, TEACHER, lock_name=f"lock.replica-{cfg.replica}.json",
                 lock_extra={"replica": cfg.replica, "replicas": cfg.replicas},
                 conflicts=lambda name, holder: name == LOCK_FILENAME or (
                     name.startswith("lock.replica-") and holder.get("replicas") != cfg.replicas))


def init_cache(cfg: TeacherConfig, own: Output | None = None) -> tuple[Path, dict[str, Any]]:
    """Create (or reopen, checking its config) the cache directory; returns (path, metadata).

    `own`: the caller's claim on the directory (`teacher_claim`; else one is taken for the planning).
    Everything in it was checked to be the teacher's own (`pipeline.ownership`) before this runs, so
    replacing a cache (--overwrite with other settings, or the leftovers of a run killed while planning)
    removes only what `kdcache teacher` wrote.
    """
    if not cfg.out:
        raise KdError("no cache directory given (--out DIR)")
    if is_url(cfg.out):
        if own is None:
            with teacher_claim(cfg):
                return _init_remote(cfg)
        return _init_remote(cfg)
    cache = Path(cfg.out)
    if cache.exists() and not cache.is_dir():
        raise KdError(f"--out {cache} is a file, not a directory")
    if own is None:
        with teacher_claim(cfg) as own:
            return init_cache(cfg, own)
    meta, counts, _ = build_meta(cfg)
    writer = CacheWriter(cache, meta, counts)
    if cache.is_dir() and any(p.name != STATE_DIR for p in cache.iterdir()):
        if not writer.planned:
            # kdcache.json is written last when planning: without it, what is ours is a killed plan,
            # redone without --overwrite, unless committed shards are there (someone removed the record).
            shards = cache / layout.SHARDS_DIR
            if shards.is_dir() and any(shards.iterdir()) and not cfg.overwrite:
                raise KdError(f"{cache} holds shards but no {layout.META_FILENAME}: it is not a complete kdcache cache; "
                              "choose another --out or pass --overwrite")
            own.remove_owned()
        else:
            diff = writer.mismatch()
            if diff and not cfg.overwrite:
                raise StaleOutput(f"{cache} holds a cache made with other settings ({', '.join(diff)}); "
                                  f"{resume_hint(cfg, diff)}pass --overwrite to replace it", diff)
            if diff:  # same settings with --overwrite: keep the committed shards (they would be identical)
                own.remove_owned()
    if not writer.planned:
        plan = (layout.INDEX_FILENAME, layout.CONFIG_FILENAME, layout.CHECKSUMS_FILENAME, layout.META_FILENAME)
        own.writing(*plan)
        writer.plan(cfg)  # index.parquet, config.yaml, kdcache.sha256, then kdcache.json last: the plan is complete
        own.record(*plan)
    return cache, meta


def _init_remote(cfg: TeacherConfig) -> tuple[str, dict[str, Any]]:
    """`init_cache` on an object store: what is under the URL must all be the teacher's (`remote.is_ours`),
    as on local disks; the plan is uploaded with kdcache.json last (`CacheWriter.plan`)."""
    from pipeline.cache import remote

    url = str(cfg.out).rstrip("/")
    store = store_for(url)
    alien = remote.foreign(store)
    if alien:
        raise KdError(f"{store.uri(alien[0])} is not a file `kdcache teacher` writes: --out must be a new prefix or "
                      "one of its caches (nothing is deleted that kdcache did not write); choose another --out")
    meta, counts, _ = build_meta(cfg)
    writer = CacheWriter(url, meta, counts)
    if not writer.planned:
        if layout.listed_commits(store) and not cfg.overwrite:
            raise KdError(f"{url} holds shards but no {layout.META_FILENAME}: it is not a complete kdcache cache; "
                          "choose another --out or pass --overwrite")
        remote.remove_owned(store)  # a plan killed half-way: redone
    else:
        diff = writer.mismatch()
        if diff and not cfg.overwrite:
            raise StaleOutput(f"{url} holds a cache made with other settings ({', '.join(diff)}); "
                              f"{resume_hint(cfg, diff)}pass --overwrite to replace it", diff)
        if diff:
            remote.remove_owned(store)
    if not writer.planned:
        writer.plan(cfg)
    return url, meta


def shard_job(cfg: TeacherConfig, meta: dict[str, Any], cache: Path, shard: dict[str, int]) -> "ShardJob":
    """Everything a worker needs for one shard (plain data: it crosses process boundaries)."""
    from pipeline.teacher.worker import ShardJob

    return ShardJob(cache=str(cache), data=cfg.data, model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                    threads=worker_threads(cfg), shard=shard, codec=meta["codec"], batch_tokens=cfg.batch_tokens,
                    head_chunk_rows=cfg.head_chunk_rows, seed=cfg.seed,
                    revision=meta["teacher"].get("revision"), parallel=cfg.parallel, compile=cfg.compile,
                    storage=storage_options() if is_url(cache) else {})


def worker_threads(cfg: TeacherConfig) -> int:
    """Torch threads per shard process: `threads`, else cores // workers for a local Dask cluster (whose
    workers would otherwise start with OMP_NUM_THREADS=1), else 0 (torch's default)."""
    if cfg.threads:
        return cfg.threads
    if cfg.workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // cfg.workers)
    return 0


def _torchrun_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_teacher(cfg: TeacherConfig, on_shard: Callable[[dict[str, Any]], None] | None = None,
                on_rows: Callable[[int], None] | None = None, on_plan: Callable[[dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:
    """Fill the cache at `cfg.out`; returns a summary (shards done now, skipped, rows, seconds).

    Progress callbacks: `on_plan(summary)` once the work is known (rows to compute), `on_rows(n)` as
    rows are computed (per batch in this process; per shard from Dask workers), `on_shard(record)` per
    committed shard. The launching process (rank 0 under torchrun) holds the cache's lock throughout.
    """
    rank, world = _torchrun_rank()
    if cfg.parallel == "tp" and world == 1:  # refused before anything is planned or written
        raise KdError("--parallel tp needs torchrun (one process per GPU of the tensor-parallel group), e.g. "
                      "torchrun --nproc_per_node 8 $(which kdcache) teacher ... --parallel tp")
    with ExitStack() as stack:
        if world > 1:
            cache, meta = _torchrun_init(cfg, stack)
        else:
            own = stack.enter_context(teacher_claim(cfg))
            cache, meta = init_cache(cfg, own)
            if hasattr(own, "check"):  # a remote cache's lease: stop before the next shard if it was lost
                on_shard = _checked(own.check, on_shard)
        return _fill(cfg, cache, meta, rank, world, on_shard, on_rows, on_plan)


def _checked(check: Callable[[], None], on_shard: Callable[[dict[str, Any]], None] | None
             ) -> Callable[[dict[str, Any]], None]:
    def call(rec: dict[str, Any]) -> None:
        if on_shard:
            on_shard(rec)
        check()

    return call


def _fill(cfg: TeacherConfig, cache: Path, meta: dict[str, Any], rank: int, world: int,
          on_shard: Callable[[dict[str, Any]], None] | None, on_rows: Callable[[int], None] | None,
          on_plan: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Compute and commit this process's share of the planned, uncommitted shards."""
    from pipeline.teacher.worker import commit_shard, compute_shard, run_shard_job

    # Who computes what: independent launches (--replica r --replicas R) split the shards first; within a
    # launch, torchrun ranks split them round-robin, except under tensor parallelism, where all ranks of the
    # group run every shard together (the forward is collective) and rank 0 alone commits.
    tp = cfg.parallel == "tp"
    committer = rank == 0 or not tp
    done = set(layout.committed_shards(cache))  # one listing (one request on an object store)
    todo = [s for s in meta["shards"] if s["index"] not in done and s["index"] % cfg.replicas == cfg.replica]
    if world > 1 and not tp:
        todo = [s for s in todo if s["index"] % world == rank]
    summary = {"cache": str(cache), "shards": len(meta["shards"]), "skipped": len(meta["shards"]) - len(todo),
               "done": 0, "rows": sum(s["row_stop"] - s["row_start"] for s in todo), "seconds": 0.0}
    if on_plan:
        on_plan(summary)
    t0 = time.perf_counter()
    jobs = [shard_job(cfg, meta, cache, s) for s in todo]
    cache_writer = CacheWriter(cache, meta)  # commits this process's shards; Dask workers open their own
    if world == 1 and cfg.replicas == 1:
        cache_writer.clean_tmp()  # leftovers of killed writes; ranks and replicas clean their own shards (below)

    def committed(rec: dict[str, Any]) -> None:
        summary["done"] += 1
        if on_shard:
            on_shard(rec)

    if todo and (cfg.workers or cfg.scheduler):
        from pipeline.teacher.dask_runner import run_on_dask

        for rec in run_on_dask(jobs, run_shard_job, cfg.workers, cfg.scheduler, worker_threads(cfg)):
            if on_rows:
                on_rows(rec["rows"])
            committed(rec)
    elif todo:
        # Writing shard i (compression, checksums, fsync) overlaps computing shard i + 1.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            for job in jobs:
                if committer:
                    cache_writer.clean_tmp(job.shard["index"])
                arrays, info = compute_shard(job, on_rows if committer else None)
                if pending is not None:
                    committed(pending.result())
                pending = writer.submit(commit_shard, job, arrays, info, cache_writer) if committer else None
            if pending is not None:
                committed(pending.result())
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _torchrun_init(cfg: TeacherConfig, stack: ExitStack) -> tuple[Path, dict[str, Any]]:
    """Under torchrun: rank 0 takes the cache's lock (held in `stack` until the run ends: the ranks of one
    launch share it) and creates or checks the cache, the others wait, then all proceed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    err = [None]
    if rank == 0:
        try:
            init_cache(cfg, stack.enter_context(teacher_claim(cfg)))
        except KdError as e:
            err = [str(e)]
    dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise KdError(err[0])
    cache = cfg.out if is_url(cfg.out) else Path(cfg.out)
    return cache, read_meta(cache)
