"""The GPU suite: every figure docs/benchmarks.md lists under "Not yet measured", in one command.

    python bench/gpu_suite.py --out DIR                        # one GPU, < 9 minutes: DIR/gpu_suite.json + .md
    python bench/gpu_suite.py --out DIR --real-llm SMOLLM2_DIR # + a real LLM from a local Hugging Face directory
    python bench/gpu_suite.py --dry-run                        # each part, its budget and figures; runs nothing
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_suite.py --smoke --out DIR   # CPU, tiny sizes, < 1 minute
    python bench/gpu_suite.py --out DIR --only teacher,student # some parts (`--only quality` resumes that run)

Parts, in order (each a function below, `part_<name>`, with its own time budget):
  cuda_paths  every CUDA-only path of the library against its CPU form on the same batch: the teacher
              worker's pinned double buffers and events (`_HostBuffers`), the bf16 head's
              `mm(out_dtype=float32)` (`pipeline.head._fp32_product`), `device_map` loading
  teacher     teacher-stage tokens/s (`run_teacher`) against a bare forward on the same batches, the MFU of
              both, with compile off and on (and whether both give the same cache): a random ~1B Llama-shaped
              teacher in bf16, V = 128,256
  fidelity    the bf16 teacher's cache against a float64 oracle of the same model on the same rows (head
              log-probs, tail mass, entropy, KD gradient cosine), and the device cache of an fp32 model
              against its CPU cache on the same rows
  real_llm    a real LLM (--real-llm DIR, e.g. SmolLM2-135M) cached on the device: rows/s in bf16, and its
              fp32 cache against its CPU cache; skipped, saying so, without --real-llm
  student     KD step / CE step with every row kept (the trainer's chunked objective), the peak GPU memory of
              a bf16 KD step chunked against full logits, and bf16 autocast against fp32 (gradient cosine):
              a ~0.4B Llama student (bench/student.py's GPU shape), V = 151,936, 8 x 2,048 tokens
  multi_gpu   a tensor-parallel teacher over 2 GPUs against the single-GPU cache; skipped on one GPU
  quality     configs/bench-quality.yaml with one seed on the device, in the time left (a re-run with the same
              --work continues it: `kdcache run` skips finished work)

How it runs: the parent process never touches the GPU; each part runs in a forked child (its own CUDA
context and process group) that appends each figure to DIR/parts/<part>.jsonl the moment it is measured,
so a part that raises, dies or overruns its budget (the child is killed) keeps what it measured, is
recorded with its one-line error, and the suite goes on. DIR/gpu_suite.json and DIR/gpu_suite.md
(the table for docs/benchmarks.md: date, GPU, torch/transformers versions, command) are rewritten after
every part.

References are independent of the code under test: the float64 oracle is the model's own forward in
float64 followed by torch.log_softmax over the full vocabulary; a cache is read through `open_cache`
(the reader contract), never compared with the project's own decode of the same bytes.

--smoke runs every part with tiny sizes on the CPU (tests/bench/test_gpu_suite.py): the device-vs-CPU
comparisons then compare the CPU with itself, so only their code is checked; the fp32 caches against the
oracle and every figure's range are checked for real.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # synthetic tokenizer names must not reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.cuda.is_available() through NVML: the parent must not initialise CUDA before it forks the parts.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

TOTAL_BUDGET_S = 540  # one H100: 9 minutes for the whole suite


# ---- what the suite measures (the dry run prints this; tests/bench/test_gpu_suite.py checks it) ------------

@dataclass(frozen=True)
class Part:
    name: str
    budget_s: int  # on a GPU (capped by what is left of --budget-s)
    smoke_budget_s: int
    what: str
    figures: tuple[tuple[str, str], ...]  # (key, label)


PARTS: tuple[Part, ...] = (
    Part("cuda_paths", 45, 90, "every CUDA-only path of the library against its CPU form on the same batch", (
        ("host_buffers_max_diff", "_HostBuffers: max |device path - CPU path| over 6 batches (0: equal)"),
        ("host_buffers_async", "_HostBuffers: copies asynchronous, with a handle to wait on (1: yes; CUDA)"),
        ("host_buffers_pinned", "_HostBuffers: host buffers pinned (1: yes; CUDA)"),
        ("mm_out_dtype", "torch.mm(out_dtype=float32) taken for a bf16 head (1: yes; CUDA)"),
        ("fp32_product_rel_diff", "bf16 head product: device path vs CPU upcast path, max |dz| / max |z|"),
        ("fp32_product_err_device", "bf16 head product, device path vs float64: max |dz| / max |z|"),
        ("fp32_product_err_cpu", "bf16 head product, CPU upcast path vs float64: max |dz| / max |z|"),
        ("device_map_same_set", "device_map teacher vs plain teacher: rows with the same top-K set"),
        ("device_map_max_dlogp", "device_map teacher vs plain teacher: max |d head log-prob| (nats)"),
    )),
    Part("teacher", 190, 90, "teacher-stage tokens/s against a bare forward on the same batches, MFU, compile off/on", (
        ("params_m", "teacher parameters (millions)"),
        ("tokens", "tokens per timed pass"),
        ("bare_tok_s", "bare forward tokens/s (model(input_ids).logits)"),
        ("teacher_tok_s", "teacher stage tokens/s, compile off (forward + statistics + encode + commit)"),
        ("ratio", "teacher / bare, compile off (goal >= 0.95)"),
        ("plan_s", "planning before the first shard (s; weights hash, not in tokens/s)"),
        ("mfu_bare", "MFU of the bare forward"),
        ("mfu_teacher", "MFU of the teacher stage, compile off"),
        ("bytes_per_row", "cache bytes per row"),
        ("compile_warmup_s", "first compiled run (s, compilation included)"),
        ("teacher_compiled_tok_s", "teacher stage tokens/s, compile on"),
        ("ratio_compiled", "teacher / bare, compile on"),
        ("mfu_teacher_compiled", "MFU of the teacher stage, compile on"),
        ("compile_speedup", "compile on / compile off tokens/s (> 1.02: compile pays)"),
        ("compiled_same_set", "compile on vs off: rows with the same top-K set"),
        ("compiled_max_dlogp", "compile on vs off: max |d head log-prob| (nats)"),
    )),
    Part("fidelity", 110, 90, "bf16 cache vs float64 oracle; device cache vs CPU cache of one fp32 model", (
        ("bf16_rows", "bf16 teacher: rows compared with the float64 oracle"),
        ("bf16_head_err_max", "bf16 cache vs oracle: max |head log-prob error| (nats)"),
        ("bf16_head_err_mean", "bf16 cache vs oracle: mean |head log-prob error| (nats)"),
        ("bf16_topk_set", "bf16 cache vs oracle: rows whose top-K set is the oracle's"),
        ("bf16_tail_rel_median", "bf16 cache vs oracle: median relative tail-mass error"),
        ("bf16_tail_rel_max", "bf16 cache vs oracle: max relative tail-mass error"),
        ("bf16_entropy_err_max", "bf16 cache vs oracle: max |entropy error| (nats)"),
        ("bf16_target_err_max", "bf16 cache vs oracle: max |target log-prob error| (nats)"),
        ("bf16_grad_cos_ideal_mean", "bf16 cache KD gradient vs the oracle's exact K+1 buckets: mean cosine"),
        ("bf16_grad_cos_ideal_min", "bf16 cache KD gradient vs the oracle's exact K+1 buckets: min cosine"),
        ("bf16_grad_cos_dense_mean", "bf16 cache KD gradient vs the dense float64 gradient: mean cosine"),
        ("ideal_grad_cos_dense_mean", "exact K+1 buckets vs the dense gradient: mean cosine (the format's bound)"),
        ("fp32_head_err_max", "fp32 device cache vs its oracle: max |head log-prob error| (nats)"),
        ("fp32_tail_rel_max", "fp32 device cache vs its oracle: max relative tail-mass error"),
        ("fp32_entropy_err_max", "fp32 device cache vs its oracle: max |entropy error| (nats)"),
        ("fp32_grad_cos_ideal_min", "fp32 device cache vs its oracle's K+1 buckets: min gradient cosine"),
        ("dev_cpu_rows", "fp32 model: rows of the device and CPU caches"),
        ("dev_cpu_identical", "device vs CPU cache: rows with identical stored bytes"),
        ("dev_cpu_same_set", "device vs CPU cache: rows with the same top-K set"),
        ("dev_cpu_max_dlogp", "device vs CPU cache: max |d head log-prob| (nats)"),
        ("dev_cpu_max_dtail", "device vs CPU cache: max |d tail log-mass|"),
        ("dev_cpu_max_dentropy", "device vs CPU cache: max |d entropy| (nats)"),
        ("compiled_cpu_same_set", "compiled device cache vs CPU cache: rows with the same top-K set"),
        ("compiled_cpu_max_dlogp", "compiled device cache vs CPU cache: max |d head log-prob| (nats)"),
    )),
    Part("real_llm", 60, 90, "a real LLM (--real-llm DIR) cached on the device: rows/s, and equality with its CPU cache", (
        ("params_m", "model parameters (millions)"),
        ("vocab", "vocabulary"),
        ("rows", "rows cached in bf16 on the device"),
        ("rows_s_bf16", "rows/s, bf16 on the device (after planning)"),
        ("eq_rows", "rows cached in fp32 on the device and on the CPU"),
        ("dev_cpu_identical", "device vs CPU fp32 cache: rows with identical stored bytes"),
        ("dev_cpu_same_set", "device vs CPU fp32 cache: rows with the same top-K set"),
        ("dev_cpu_max_dlogp", "device vs CPU fp32 cache: max |d head log-prob| (nats)"),
        ("dev_cpu_max_dtail", "device vs CPU fp32 cache: max |d tail log-mass|"),
    )),
    Part("student", 110, 90, "KD/CE step with every row kept, peak GPU memory chunked vs full logits, autocast vs fp32", (
        ("params_m", "student parameters (millions)"),
        ("targets", "targets per micro-batch"),
        ("ce_step_s", "CE step (s, median)"),
        ("kd_step_s", "KD step (s, median; fkl, topk gate x0.5, IDTS)"),
        ("kd_ce_ratio", "KD step / CE step (goal <= 1.10)"),
        ("kept_fraction", "rows kept by the KD steps (1: every row reaches the divergence)"),
        ("student_rows_s", "student rows/s (KD)"),
        ("autocast_grad_cos", "KD gradient, bf16 autocast vs fp32 on the same batch: cosine"),
        ("autocast_grad_norm_ratio", "KD gradient norm, bf16 autocast / fp32"),
        ("chunked_step_s", "one KD forward + backward, chunked objective (s)"),
        ("full_step_s", "one KD forward + backward, full [N, V] logits (s)"),
        ("peak_chunked_gb", "peak GPU memory of a KD step, chunked (GB; CUDA)"),
        ("peak_full_gb", "peak GPU memory of a KD step, full logits (GB; CUDA; -1: out of memory)"),
        ("step_chunked_gb", "of which the step itself, chunked (GB above the weights and optimizer state)"),
        ("step_full_gb", "of which the step itself, full logits (GB)"),
    )),
    Part("multi_gpu", 150, 30, "a tensor-parallel teacher over 2 GPUs against the single-GPU cache (>= 2 GPUs)", (
        ("tp_same_set", "TP vs single-GPU fp32 cache: rows with the same top-K set"),
        ("tp_max_dlogp", "TP vs single-GPU fp32 cache: max |d head log-prob| (nats)"),
        ("tp_rows_s", "TP teacher rows/s, bf16 (CLI wall time, loading included)"),
        ("single_rows_s", "single-GPU teacher rows/s, bf16 (CLI wall time, loading included)"),
    )),
    Part("quality", 600, 120, "configs/bench-quality.yaml, one seed, on the device, in the time left", (
        ("wall_s", "wall time of `kdcache run` (s; this call)"),
        ("students_trained", "students trained (of students_total)"),
        ("students_total", "students in the run"),
        ("students_evaluated", "students evaluated"),
        ("heldout_ce", "held-out CE per student (nats)"),
        ("teacher_ce", "held-out CE per teacher (nats)"),
    )),
)
PART_NAMES = tuple(p.name for p in PARTS)

# docs/benchmarks.md, "Not yet measured": each bullet's bold label and the part that measures it.
NOT_YET_MEASURED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Teacher stage tokens/s against a bare forward pass on a GPU", "teacher", ("bare_tok_s", "teacher_tok_s", "ratio")),
    ("MFU of the teacher stage and of the bare forward", "teacher", ("mfu_bare", "mfu_teacher")),
    ("torch.compile of the statistics on a GPU", "teacher",
     ("teacher_compiled_tok_s", "compile_speedup", "compiled_same_set")),
    ("The bf16 teacher's cache against a float64 oracle", "fidelity",
     ("bf16_head_err_max", "bf16_tail_rel_max", "bf16_entropy_err_max", "bf16_grad_cos_ideal_mean")),
    ("The CUDA cache against the CPU cache of the same fp32 model", "fidelity",
     ("dev_cpu_same_set", "dev_cpu_max_dlogp", "compiled_cpu_same_set")),
    ("A real LLM cached on the GPU", "real_llm", ("rows_s_bf16", "dev_cpu_same_set")),
    ("KD/CE student step ratio on an H100", "student", ("kd_ce_ratio", "kept_fraction")),
    ("Peak GPU memory of a bf16 student step", "student", ("peak_chunked_gb", "peak_full_gb")),
    ("The CUDA-only code paths against their CPU forms", "cuda_paths",
     ("host_buffers_max_diff", "fp32_product_rel_diff", "device_map_same_set")),
    ("A tensor-parallel teacher across GPUs", "multi_gpu", ("tp_same_set", "tp_rows_s")),
    ("The quality benchmark on one GPU", "quality", ("wall_s", "heldout_ce")),
)


# ---- sizes --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    big: dict[str, int]  # the ~1B bf16 teacher (bench/teacher.py's `1b` shape at V = 128,256)
    big_seqs: int
    big_seq: int
    big_batch_tokens: int
    repeats: int
    oracle_seqs: int  # sequences of big_seq compared with the float64 oracle
    small: dict[str, int]  # the fp32 model of the device-vs-CPU comparisons
    small_seqs: int
    small_seq: int
    oracle_block: int  # rows per float64 block
    real_max_length: int
    real_examples: int
    real_eq_examples: int
    student_vocab: int
    student_hidden: int
    student_layers: int
    student_seq: int
    student_batch: int
    student_steps: int
    peak_tflops: float | None  # None: from the GPU's name


def sizes_for(smoke: bool) -> Sizes:
    if smoke:
        tiny = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048)
        return Sizes(big=tiny, big_seqs=16, big_seq=64, big_batch_tokens=512, repeats=1, oracle_seqs=2,
                     small=dict(tiny, hidden=32, intermediate=64), small_seqs=4, small_seq=64, oracle_block=64,
                     real_max_length=64, real_examples=24, real_eq_examples=6, student_vocab=2048, student_hidden=64,
                     student_layers=2, student_seq=64, student_batch=4, student_steps=2, peak_tflops=1.0)
    big = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=128256)
    return Sizes(big=big, big_seqs=64, big_seq=2048, big_batch_tokens=16384, repeats=2, oracle_seqs=2,
                 small=dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=128256), small_seqs=4,
                 small_seq=1024, oracle_block=512, real_max_length=1024, real_examples=96, real_eq_examples=8,
                 student_vocab=151936, student_hidden=896, student_layers=24, student_seq=2048, student_batch=8,
                 student_steps=6, peak_tflops=None)


# ---- what a part has: settings, a work directory, a recorder, a deadline --------------------------------

class Recorder:
    """Appends each figure / note / status of a part to its .jsonl file at once (a killed part keeps them)."""

    def __init__(self, path: Path, part: Part):
        self.path, self.part = path, part
        self.keys = {k for k, _ in part.figures}

    def _write(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event, default=_jsonable) + "\n")

    def fig(self, key: str, value: Any) -> None:
        if key not in self.keys:
            raise KeyError(f"part {self.part.name}: figure {key!r} is not in PARTS (add it, so the dry run lists it)")
        self._write({"fig": key, "value": value})
        print(f"[{self.part.name}] {key} = {_fmt(value)}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self._write({"note": text})
        print(f"[{self.part.name}] {text}", file=sys.stderr, flush=True)

    def skip(self, why: str) -> None:
        self._write({"skipped": why})
        print(f"[{self.part.name}] skipped: {why}", file=sys.stderr, flush=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


@dataclass
class Session:
    args: argparse.Namespace
    sizes: Sizes
    device: str  # "cuda" or "cpu"
    work: Path
    out: Path
    rec: Recorder | None = None
    deadline: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def log(self, msg: str) -> None:
        print(f"[{self.rec.part.name if self.rec else 'suite'}] {msg}", file=sys.stderr, flush=True)


# ---- shared assets: synthetic data and random Llama teachers, built once per work directory ------------------

def synthetic_data(s: Session, name: str, vocab: int, n: int, seq: int, seed: int = 0) -> Path:
    """A prepared dataset of n random sequences of `seq` tokens (bench/student.py's `synthetic_prepared`)."""
    import student as student_bench

    d = s.work / f"data_{name}"
    if not (d / "kdcache_prepare.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        student_bench.synthetic_prepared(d, vocab, n, seq, seed)
    return d


def token_rows(prepared: Path) -> tuple[list[list[int]], list[list[int]]]:
    from pipeline.data.prepare import load_prepared

    ds = load_prepared(prepared)
    return [list(x) for x in ds["input_ids"]], [list(x) for x in ds["loss_mask"]]


def llama_teacher(s: Session, name: str, dims: dict[str, int], dtype: str, seq: int, head_scale: float = 8.0) -> Path:
    """A random-initialised Llama (bench/teacher.py's `build_model`, head x head_scale as there) saved in `dtype`;
    built on the device (a ~1B model initialises in a second there, not in a minute on the CPU)."""
    import torch

    import teacher as teacher_bench

    d = s.work / f"model_{name}"
    if (d / ".complete").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    ns = argparse.Namespace(**dims, seq_len=seq, seed=0)
    with torch.device(s.device):
        model = teacher_bench.build_model(ns, d)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.to(getattr(torch, dtype)).save_pretrained(d)
    (d / ".complete").write_text("")
    del model
    free_memory()
    return d


def free_memory() -> None:
    """Drop the teacher the worker keeps loaded and give cached GPU memory back."""
    import torch

    from pipeline.teacher import worker

    worker._MODEL.clear()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def cache_of(s: Session, data: Path, model: Path, out: Path, device: str, dtype: str, compile: str = "never",
             parallel: str = "none", batch_tokens: int = 8192, on_plan: Callable | None = None) -> tuple[float, float]:
    """Cache `data` with `model` at `out` from scratch -> (seconds in all, seconds after planning)."""
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    shutil.rmtree(out, ignore_errors=True)
    cfg = TeacherConfig(data=str(data), model=str(model), out=str(out), device=device, dtype=dtype, compile=compile,
                        parallel=parallel, batch_tokens=batch_tokens, overwrite=True)
    mark = [0.0]

    def planned(summary: dict[str, Any]) -> None:
        s.sync()
        mark[0] = time.perf_counter()
        if on_plan:
            on_plan(summary)

    s.sync()
    t0 = time.perf_counter()
    run_teacher(cfg, on_plan=planned)
    s.sync()
    t1 = time.perf_counter()
    return t1 - t0, t1 - mark[0]


def compare_caches(a: Path, b: Path) -> dict[str, float]:
    """Cache b against cache a, row by row: identical stored bytes, the same top-K set, and on rows with the same
    set the largest differences of head log-probs (matched by id), tail log-mass and entropy."""
    import numpy as np

    from pipeline.cache import open_cache

    ca, cb = open_cache(a), open_cache(b)
    if ca.num_rows != cb.num_rows:
        raise AssertionError(f"{a} has {ca.num_rows} rows, {b} {cb.num_rows}")
    n = ca.num_rows
    identical = same = 0
    dlp = dtail = dent = 0.0
    fields = ("topk_ids", "topk_logprobs", "tail_logprob", "entropy", "target_ids")
    for r0 in range(0, n, 65536):
        r1 = min(n, r0 + 65536)
        raw_a, raw_b = ca.read_raw(r0, r1), cb.read_raw(r0, r1)
        eq = np.ones(r1 - r0, bool)
        for name, x in raw_a.items():
            eq &= (x == raw_b[name]).reshape(r1 - r0, -1).all(1)
        identical += int(eq.sum())
        ra, rb = ca.read(r0, r1, fields), cb.read(r0, r1, fields)
        if not np.array_equal(ra["target_ids"], rb["target_ids"]):
            raise AssertionError(f"{a} and {b} hold other targets")
        ia, ib = ra["topk_ids"], rb["topk_ids"]
        oa, ob = np.argsort(ia, 1), np.argsort(ib, 1)
        sa, sb = np.take_along_axis(ia, oa, 1), np.take_along_axis(ib, ob, 1)
        rows = (sa == sb).all(1)
        same += int(rows.sum())
        if rows.any():
            la = np.take_along_axis(ra["topk_logprobs"], oa, 1)[rows]
            lb = np.take_along_axis(rb["topk_logprobs"], ob, 1)[rows]
            dlp = max(dlp, float(np.abs(la - lb).max()))
            ta, tb = ra["tail_logprob"][rows], rb["tail_logprob"][rows]
            fin = np.isfinite(ta) & np.isfinite(tb)
            if (np.isfinite(ta) != np.isfinite(tb)).any():
                dtail = float("inf")
            elif fin.any():
                dtail = max(dtail, float(np.abs(ta[fin] - tb[fin]).max()))
            dent = max(dent, float(np.abs(ra["entropy"][rows] - rb["entropy"][rows]).max()))
    return {"rows": n, "identical": identical / n, "same_set": same / n, "max_dlogp": dlp, "max_dtail": dtail,
            "max_dentropy": dent}


# ---- the float64 oracle ---------------------------------------------------------------------------------

class OracleStats:
    """Per-row errors of a cache against float64 log-probs of the same rows, accumulated over blocks."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}

    def add(self, **arrays: Any) -> None:
        for k, v in arrays.items():
            self.parts.setdefault(k, []).append(v.detach().double().cpu())

    def cat(self, k: str) -> Any:
        import torch

        return torch.cat(self.parts[k])


def oracle_compare(s: Session, model_dir: Path, prepared: Path, cache_dir: Path, dev: str) -> dict[str, float]:
    """The cache at `cache_dir` against the model's own forward in float64 (its weights upcast) over the full
    vocabulary, on the same rows. Gradients at T = 1 against a student z = 0.5 log p + N(0, 1) per entry."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import fidelity as fidelity_bench
    from peers import Decoded
    from pipeline.cache import open_cache

    free_memory()
    cache = open_cache(cache_dir)
    k = cache.k
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64, device_map={"": dev}).eval()
    ids_list, masks = token_rows(prepared)
    gen = torch.Generator(device=dev).manual_seed(0)
    st = OracleStats()
    row = 0
    fields = ("topk_ids", "topk_logprobs", "tail_logprob", "entropy", "target_logprobs", "target_ids")
    with torch.inference_mode():
        for ids, mask in zip(ids_list, masks):
            tpos = np.nonzero(np.asarray(mask)[1:])[0] + 1  # targets: t >= 1 with mask 1 (docs/cache-format.md)
            if not len(tpos):
                continue
            x = torch.as_tensor([ids], device=dev)
            logits = model(input_ids=x).logits[0, :, : cache.vocab_size].double()
            lp_all = torch.log_softmax(logits[torch.as_tensor(tpos - 1, device=dev)], dim=-1)  # [n, V]
            del logits
            tgt = torch.as_tensor(np.asarray(ids)[tpos], device=dev)
            for a in range(0, len(tpos), s.sizes.oracle_block):
                lp = lp_all[a: a + s.sizes.oracle_block]
                n = lp.shape[0]
                r0, r1 = row + a, row + a + n
                r = cache.read(r0, r1, fields)
                if not np.array_equal(r["target_ids"], tgt[a: a + n].cpu().numpy()):
                    raise AssertionError(f"cache rows {r0}-{r1} are not the oracle's targets")
                cids = torch.as_tensor(r["topk_ids"], device=dev)
                p = lp.exp()
                in_s = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, cids, True)
                head_err = (lp.gather(1, cids) - torch.as_tensor(r["topk_logprobs"], device=dev).double()).abs()
                log_r = torch.logsumexp(lp.masked_fill(in_s, -torch.inf), dim=-1)  # the exact tail of the cached set
                tail_rel = torch.expm1(torch.as_tensor(r["tail_logprob"], device=dev).double() - log_r).abs()
                ent = -(p * lp).sum(-1)
                ent_err = (torch.as_tensor(r["entropy"], device=dev).double() - ent).abs()
                tgt_err = (torch.as_tensor(r["target_logprobs"], device=dev).double()
                           - lp.gather(1, tgt[a: a + n, None])[:, 0]).abs()
                otop = lp.topk(k, dim=-1).indices
                same_set = (otop.sort(1).values == cids.sort(1).values).all(1)
                # KD gradients (bench/fidelity.py's formula for any K + 1 bucket format), all in float64.
                z = 0.5 * lp + torch.randn(lp.shape, generator=gen, device=dev, dtype=torch.float64)
                q = torch.softmax(z, dim=-1)
                dec, _ = fidelity_bench.kdcache_rows(cache, r0, r1, 1.0)
                dec = Decoded(dec.ids.to(dev), dec.valid.to(dev), dec.mass.to(dev), dec.tail.to(dev))
                g_cache = fidelity_bench.format_grad(dec, q, 1.0, in_s)
                in_o = torch.zeros_like(in_s).scatter_(1, otop, True)
                ideal = Decoded(otop, torch.ones_like(otop, dtype=torch.bool), p.gather(1, otop),
                                torch.logsumexp(lp.masked_fill(in_o, -torch.inf), dim=-1).exp())
                g_ideal = fidelity_bench.format_grad(ideal, q, 1.0, in_o)
                dense = q - p
                st.add(head_err=head_err.reshape(-1), tail_rel=tail_rel, ent_err=ent_err, tgt_err=tgt_err,
                       same_set=same_set, cos_ideal=fidelity_bench.cosine(g_cache, g_ideal),
                       cos_dense=fidelity_bench.cosine(g_cache, dense), ideal_dense=fidelity_bench.cosine(g_ideal, dense))
                del p, q, z, in_s, in_o, g_cache, g_ideal, dense
            row += len(tpos)
            del lp_all
    del model
    free_memory()
    if row != cache.num_rows:
        raise AssertionError(f"the oracle covered {row} rows, the cache holds {cache.num_rows}")
    tail = st.cat("tail_rel")
    return {"rows": row, "head_err_max": float(st.cat("head_err").max()), "head_err_mean": float(st.cat("head_err").mean()),
            "topk_set": float(st.cat("same_set").mean()), "tail_rel_median": float(tail.median()),
            "tail_rel_max": float(tail.max()), "entropy_err_max": float(st.cat("ent_err").max()),
            "target_err_max": float(st.cat("tgt_err").max()), "grad_cos_ideal_mean": float(st.cat("cos_ideal").mean()),
            "grad_cos_ideal_min": float(st.cat("cos_ideal").min()), "grad_cos_dense_mean": float(st.cat("cos_dense").mean()),
            "ideal_grad_cos_dense_mean": float(st.cat("ideal_dense").mean())}


# ---- the parts ------------------------------------------------------------------------------------------

def part_cuda_paths(s: Session) -> None:
    """Each CUDA-only path of the library on the device against its CPU form, on the same inputs."""
    import torch

    from pipeline.head import _fp32_product
    from pipeline.teacher.worker import _HostBuffers

    dev = torch.device(s.device)
    rec = s.rec
    # 1. The worker's double host buffers: the worker's order (copy batch i, then read batch i - 1) on the device
    # and on the CPU, over batches of changing sizes; every result must equal its source.
    g = torch.Generator().manual_seed(0)
    sizes = [300, 1500, 40, 2600, 700, 1100]
    src = [{"topk_ids": torch.randint(0, 128256, (n, 8), generator=g), "topk_logprobs": torch.randn(n, 8, generator=g),
            "tail_shape": torch.randn(n, 4, generator=g), "target": torch.randint(0, 128256, (n,), generator=g)}
           for n in sizes]
    worst, pinned, asynchronous = 0.0, True, True
    for path_dev in (dev, torch.device("cpu")):
        hb = _HostBuffers(path_dev)
        pending = None
        got = []

        def finish(p: tuple) -> None:
            i, out, done = p
            if done is not None:
                done.synchronize()
            got.append((i, {n: t.clone() for n, t in out.items()}))

        for i, b in enumerate(src):
            on_dev = {n: t.to(path_dev) for n, t in b.items()}
            out, done = hb.copy(on_dev)
            if path_dev == dev:
                pinned &= all(t.is_pinned() for t in out.values()) if s.cuda else False
                asynchronous &= done is not None
            if pending is not None:
                finish(pending)
            pending = (i, out, done)
        finish(pending)
        for i, out in got:
            for n, t in out.items():
                worst = max(worst, float((t.double() - src[i][n].double()).abs().max()))
    rec.fig("host_buffers_max_diff", worst)
    rec.fig("host_buffers_async", int(asynchronous and s.cuda))
    rec.fig("host_buffers_pinned", int(pinned and s.cuda))
    # 2. The bf16 head's float32 product: mm(out_dtype=float32) on CUDA, upcast slices elsewhere.
    h = (torch.randn(256, 512, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(8192, 512, generator=g) * 0.05).to(torch.bfloat16)
    exact = h.double() @ w.double().T
    scale = float(exact.abs().max())
    z_dev = _fp32_product(h.to(dev), w.to(dev)).cpu()
    z_cpu = _fp32_product(h, w)
    taken = 0
    if s.cuda:
        try:
            torch.mm(h.to(dev), w.to(dev).T, out_dtype=torch.float32)
            taken = 1
        except (TypeError, RuntimeError, NotImplementedError) as e:
            rec.note(f"torch.mm(out_dtype=float32) unavailable here ({str(e).splitlines()[0][:120]}): the upcast path runs")
    rec.fig("mm_out_dtype", taken)
    rec.fig("fp32_product_rel_diff", float((z_dev.double() - z_cpu.double()).abs().max()) / scale)
    rec.fig("fp32_product_err_device", float((z_dev.double() - exact).abs().max()) / scale)
    rec.fig("fp32_product_err_cpu", float((z_cpu.double() - exact).abs().max()) / scale)
    # 3. device_map loading (accelerate's dispatch; one GPU holds every layer) against the plain device teacher.
    z = s.sizes
    model = llama_teacher(s, "small", z.small, "float32", z.small_seq)
    data = synthetic_data(s, "small", z.small["vocab"], z.small_seqs, z.small_seq, seed=2)
    cache_of(s, data, model, s.work / "cuda_paths_plain", s.device, "float32")
    free_memory()
    cache_of(s, data, model, s.work / "cuda_paths_device_map", s.device, "float32", parallel="device_map")
    free_memory()
    c = compare_caches(s.work / "cuda_paths_plain", s.work / "cuda_paths_device_map")
    rec.fig("device_map_same_set", c["same_set"])
    rec.fig("device_map_max_dlogp", c["max_dlogp"])
    if not s.cuda:
        rec.note("device cpu: the CUDA branches (pinned buffers, events, mm out_dtype) did not run; "
                 "this checked the comparisons' code")


def _mfu(s: Session, tok_s: float, fpt: float) -> float | None:
    peak = s.info.get("peak_tflops")
    return tok_s * fpt / (peak * 1e12) if peak else None


def part_teacher(s: Session) -> None:
    """Teacher-stage tokens/s against a bare forward on the same batches; MFU; compile off and on."""
    import torch

    import teacher as teacher_bench
    from pipeline.cache import open_cache
    from pipeline.data.batching import token_budget_batches
    from pipeline.teacher.worker import get_model

    z, rec = s.sizes, s.rec
    model_dir = llama_teacher(s, "big", z.big, "bfloat16", z.big_seq)
    data = synthetic_data(s, "big", z.big["vocab"], z.big_seqs, z.big_seq, seed=0)
    ids, _ = token_rows(data)
    model, dev, _ = get_model(str(model_dir), s.device, "bfloat16")  # run_teacher reuses this very model
    n_tokens = sum(len(x) for x in ids)
    batches = token_budget_batches([len(x) for x in ids], z.big_batch_tokens)
    rec.fig("params_m", sum(p.numel() for p in model.parameters()) / 1e6)
    rec.fig("tokens", n_tokens)
    fpt = teacher_bench.count_flops_per_token(model.config, z.big_seq)

    inputs = [torch.as_tensor([ids[i] for i in b]) for b in batches]  # host tensors, as the teacher pass has

    @torch.inference_mode()
    def bare() -> float:
        s.sync()
        t = time.perf_counter()
        for x in inputs:
            model(input_ids=x.to(dev)).logits  # no mask, as the teacher pass (right padding, causal attention)
        s.sync()
        return time.perf_counter() - t

    def teacher(out: Path, compile: str) -> tuple[float, float]:
        return cache_of(s, data, model_dir, out, s.device, "bfloat16", compile=compile, batch_tokens=z.big_batch_tokens)

    bare()  # warm-up: allocator, kernels
    eager = s.work / "teacher_eager"
    t_bare = t_eager = t_run = float("inf")
    for _ in range(z.repeats):
        t_bare = min(t_bare, bare())
        total, after_plan = teacher(eager, "never")
        t_run = min(t_run, total)
        t_eager = min(t_eager, after_plan)
        rec.fig("bare_tok_s", n_tokens / t_bare)
        rec.fig("teacher_tok_s", n_tokens / t_eager)
        rec.fig("ratio", t_bare / t_eager)
        rec.fig("plan_s", total - after_plan)
    rec.fig("mfu_bare", _mfu(s, n_tokens / t_bare, fpt))
    rec.fig("mfu_teacher", _mfu(s, n_tokens / t_eager, fpt))
    c = open_cache(eager)
    rec.fig("bytes_per_row", c.bytes_on_disk() / c.num_rows)
    if s.args.smoke and not s.cuda:
        rec.note("compile on: not run in the CPU smoke (compiling takes ~25 s on this CPU); "
                 "tests/cache/test_cache_oracle.py checks compiled = eager statistics on CPU")
        return
    if s.left() < 60:
        rec.note(f"compile on: not run, {s.left():.0f} s left of the part's budget")
        return
    compiled = s.work / "teacher_compiled"
    total, _ = teacher(compiled, "always")
    rec.fig("compile_warmup_s", total)
    t_comp = float("inf")
    for _ in range(z.repeats):
        if s.left() < 2 * t_run + 10:
            rec.note(f"compile on: {s.left():.0f} s left of the part's budget, no further timed run")
            break
        t_comp = min(t_comp, teacher(compiled, "always")[1])
        rec.fig("teacher_compiled_tok_s", n_tokens / t_comp)
        rec.fig("ratio_compiled", t_bare / t_comp)
        rec.fig("mfu_teacher_compiled", _mfu(s, n_tokens / t_comp, fpt))
        rec.fig("compile_speedup", t_eager / t_comp)
    cmp = compare_caches(eager, compiled)
    rec.fig("compiled_same_set", cmp["same_set"])
    rec.fig("compiled_max_dlogp", cmp["max_dlogp"])
    if t_comp < float("inf"):
        pays = t_eager / t_comp > 1.02 and cmp["same_set"] > 0.99
        rec.note(f"compile {'pays' if pays else 'does not pay'} here ({t_eager / t_comp:.3f}x): "
                 + ("make `compile: auto` mean compile on CUDA (pipeline/teacher/worker.py)" if pays else
                    "keep `compile: auto` = eager"))


def part_fidelity(s: Session) -> None:
    """The bf16 teacher's cache against a float64 oracle; an fp32 model's device cache against its CPU cache."""
    z, rec = s.sizes, s.rec
    # bf16: the big teacher over a few of its sequences.
    big = llama_teacher(s, "big", z.big, "bfloat16", z.big_seq)
    data = synthetic_data(s, "oracle", z.big["vocab"], z.oracle_seqs, z.big_seq, seed=1)
    cache_of(s, data, big, s.work / "fidelity_bf16", s.device, "bfloat16")
    o = oracle_compare(s, big, data, s.work / "fidelity_bf16", s.device)
    rec.fig("bf16_rows", o["rows"])
    for key in ("head_err_max", "head_err_mean", "topk_set", "tail_rel_median", "tail_rel_max", "entropy_err_max",
                "target_err_max", "grad_cos_ideal_mean", "grad_cos_ideal_min", "grad_cos_dense_mean"):
        rec.fig(f"bf16_{key}", o[key])
    rec.fig("ideal_grad_cos_dense_mean", o["ideal_grad_cos_dense_mean"])
    # fp32: one small model cached on the device and on the CPU, the device cache also against its oracle.
    small = llama_teacher(s, "small", z.small, "float32", z.small_seq)
    data = synthetic_data(s, "small", z.small["vocab"], z.small_seqs, z.small_seq, seed=2)
    dev_cache, cpu_cache = s.work / "fidelity_fp32_device", s.work / "fidelity_fp32_cpu"
    cache_of(s, data, small, dev_cache, s.device, "float32")
    free_memory()
    cache_of(s, data, small, cpu_cache, "cpu", "float32")
    free_memory()
    c = compare_caches(cpu_cache, dev_cache)
    rec.fig("dev_cpu_rows", c["rows"])
    for key in ("identical", "same_set", "max_dlogp", "max_dtail", "max_dentropy"):
        rec.fig(f"dev_cpu_{key}", c[key])
    o = oracle_compare(s, small, data, dev_cache, s.device)
    for key in ("head_err_max", "tail_rel_max", "entropy_err_max", "grad_cos_ideal_min"):
        rec.fig(f"fp32_{key}", o[key])
    if not s.cuda:
        rec.note("device cpu: the device cache is a second CPU cache (the comparison's code ran, not CUDA)")
        return
    if s.left() < 45:
        rec.note(f"compiled device cache vs CPU: not run, {s.left():.0f} s left")
        return
    comp = s.work / "fidelity_fp32_compiled"
    cache_of(s, data, small, comp, s.device, "float32", compile="always")
    c = compare_caches(cpu_cache, comp)
    rec.fig("compiled_cpu_same_set", c["same_set"])
    rec.fig("compiled_cpu_max_dlogp", c["max_dlogp"])


def _text_records(path: Path, chunk: int = 3000) -> Path:
    """This repository's docs and sources as {"text": ...} records of ~chunk characters (real text, offline)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "pipeline").rglob("*.py"))]
    with open(path, "w") as f:
        for p in files:
            t = p.read_text(errors="replace")
            for a in range(0, len(t), chunk):
                f.write(json.dumps({"text": t[a: a + chunk]}) + "\n")
    return path


def _stand_in_llm(s: Session, texts: Path) -> Path:
    """--smoke without --real-llm: a tiny Llama with tied embeddings and a BPE tokenizer trained here, saved as a
    Hugging Face directory, so the part's path (prepare with the model's tokenizer, load, cache) runs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.data.bpe_tokenizer import train_tokenizer

    d = s.work / "stand_in_llm"
    if (d / ".complete").is_file():
        return d
    lines = [json.loads(x)["text"] for x in texts.read_text().splitlines()[:200]]
    tok = train_tokenizer(lines, d, vocab_size=400)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    (d / ".complete").write_text("")
    return d


def part_real_llm(s: Session) -> None:
    """A real LLM from a local directory cached on the device (bf16 rows/s) and in fp32 against its CPU cache."""
    from pipeline.data.prepare import PrepareConfig, prepare
    from pipeline.teacher.worker import get_model

    z, rec = s.sizes, s.rec
    texts = _text_records(s.work / "real_text.jsonl")
    if s.args.real_llm:
        llm = Path(s.args.real_llm).expanduser()
        if not (llm / "config.json").is_file():
            raise FileNotFoundError(f"--real-llm {llm}: no config.json there (a local Hugging Face model directory)")
    elif s.args.smoke:
        llm = _stand_in_llm(s, texts)
        rec.note("no --real-llm: a tiny stand-in (random Llama, tokenizer trained here) runs the same path")
    else:
        rec.skip("no --real-llm DIR given (a local Hugging Face directory of e.g. SmolLM2-135M); nothing measured")
        return
    data, eq_data = s.work / "real_prepared", s.work / "real_prepared_eq"
    for out, n in ((data, z.real_examples), (eq_data, z.real_eq_examples)):
        if not (out / "kdcache_prepare.json").is_file():
            prepare(PrepareConfig(data=str(texts), tokenizer=str(llm), out=str(out), max_length=z.real_max_length,
                                  max_examples=n, overwrite=True))
    model, _, _ = get_model(str(llm), s.device, "bfloat16")  # loaded (and its head checked) outside the timing
    rec.fig("params_m", sum(p.numel() for p in model.parameters()) / 1e6)
    rec.fig("vocab", int(model.config.vocab_size))
    del model
    from pipeline.cache import open_cache

    out = s.work / "real_bf16"
    cache_of(s, data, llm, out, s.device, "bfloat16")  # warm-up (kernels, allocator)
    _, after_plan = cache_of(s, data, llm, out, s.device, "bfloat16")
    rows = open_cache(out).num_rows
    rec.fig("rows", rows)
    rec.fig("rows_s_bf16", rows / after_plan)
    free_memory()
    dev_c, cpu_c = s.work / "real_fp32_device", s.work / "real_fp32_cpu"
    cache_of(s, eq_data, llm, dev_c, s.device, "float32")
    free_memory()
    cache_of(s, eq_data, llm, cpu_c, "cpu", "float32")
    free_memory()
    c = compare_caches(cpu_c, dev_c)
    rec.fig("eq_rows", c["rows"])
    for key in ("identical", "same_set", "max_dlogp", "max_dtail"):
        rec.fig(f"dev_cpu_{key}", c[key])


def part_student(s: Session) -> None:
    """KD step / CE step with every row kept, autocast vs fp32, peak memory chunked vs full logits."""
    import statistics

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import student as student_bench
    from pipeline.losses.objective import kd_terms
    from pipeline.teacher.runner import TeacherConfig, run_teacher
    from pipeline.training.config import TrainConfig
    from pipeline.training.student import TargetLogits
    from pipeline.training.trainer import Trainer

    z, rec = s.sizes, s.rec
    v = z.student_vocab
    n_ex = (z.student_steps + 2) * z.student_batch
    data = synthetic_data(s, "student", v, n_ex, z.student_seq, seed=3)
    tdir = s.work / "student_teacher"
    if not (tdir / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            str(student_bench.llama_config(s.work / "student_teacher.json", v, 128, 2)))).save_pretrained(tdir)
    cache = s.work / "student_cache"
    run_teacher(TeacherConfig(data=str(data), model=str(tdir), out=str(cache), device=s.device, dtype="float32"))
    free_memory()
    scfg = str(student_bench.llama_config(s.work / "student.json", v, z.student_hidden, z.student_layers))
    common = dict(data=str(data), student_config=scfg, batch_size=z.student_batch, max_steps=10_000, seed=0,
                  shuffle=False, device=s.device, report_to=["none"])
    ce = Trainer(TrainConfig(out=str(s.work / "student_ce"), loss="none", **common))
    kd = Trainer(TrainConfig(out=str(s.work / "student_kd"), cache=str(cache), loss="fkl", gate="topk", gate_k=5,
                             reject_weight=0.5, idts=True, **common))
    kd.model.load_state_dict(ce.model.state_dict())
    rec.fig("params_m", sum(p.numel() for p in kd.model.parameters()) / 1e6)
    it = iter(kd.stream)
    batches = [next(it).to(kd.device) for _ in range(z.student_steps + 2)]
    rec.fig("targets", statistics.mean(mb.num_targets for mb in batches))
    # bench/student.py's loop: the same micro-batches, CE and KD interleaved step by step, medians.
    t_ce, t_kd, kept = [], [], []
    pairs = [(ce, t_ce), (kd, t_kd)]
    for i, mb in enumerate(batches):
        for trainer, times in (pairs if i % 2 == 0 else pairs[::-1]):
            s.sync()
            t0 = time.perf_counter()
            row = trainer.train_step([mb])
            s.sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
            if trainer is kd:
                kept.append(row["kept_fraction"])
        if i >= 2:
            a, b = statistics.median(t_ce), statistics.median(t_kd)
            rec.fig("ce_step_s", a)
            rec.fig("kd_step_s", b)
            rec.fig("kd_ce_ratio", b / a)
            rec.fig("kept_fraction", min(kept))
            rec.fig("student_rows_s", statistics.mean(m.num_targets for m in batches) / b)
    del ce, pairs
    free_memory()
    # bf16 autocast (the trainer's default on CUDA) against float32: gradients of the same KD loss, same weights.
    mb = batches[0]

    def grads() -> torch.Tensor:
        kd.train_step([mb], apply=False)
        return torch.cat([p.grad.reshape(-1).double() for p in kd.model.parameters() if p.grad is not None])

    g_auto = grads()
    auto, kd.autocast = kd.autocast, nullcontext()
    g_fp32 = grads()
    kd.autocast = auto
    rec.fig("autocast_grad_cos", float(g_auto @ g_fp32 / (g_auto.norm() * g_fp32.norm())))
    rec.fig("autocast_grad_norm_ratio", float(g_auto.norm() / g_fp32.norm()))
    if not s.cuda:
        rec.note("device cpu: the trainer has no autocast off CUDA, so this compared fp32 with fp32")
    del g_auto, g_fp32
    kd.optimizer.zero_grad(set_to_none=True)
    free_memory()

    # Peak memory of one KD forward + backward: the trainer's chunked objective, then full [N, V] logits.
    def peak_of(step: Callable[[], None]) -> tuple[float, float | None, float | None]:
        kd.optimizer.zero_grad(set_to_none=True)
        free_memory()
        if s.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        s.sync()
        t0 = time.perf_counter()
        step()
        s.sync()
        dt = time.perf_counter() - t0
        if not s.cuda:
            return dt, None, None
        peak = torch.cuda.max_memory_allocated()
        return dt, peak / 1e9, (peak - base) / 1e9

    def chunked() -> None:
        kd.train_step([mb], apply=False)

    def full() -> None:
        gen = torch.Generator(device=kd.device).manual_seed(0)
        with kd.autocast:
            logits = TargetLogits(kd.model)(mb.input_ids, mb.attention_mask, mb.tgt_b, mb.tgt_t)
            with torch.no_grad():  # ce_weight 0: CE is reported, not trained (as the trainer does)
                torch.nn.functional.cross_entropy(logits, mb.target_ids, reduction="sum")
            terms = kd_terms(logits, mb.cache, kd.cfg, kd.cache.vocab_size, kd.grid_betas.to(kd.device), None, gen,
                             groups=mb.tgt_b)
            loss = terms.numerator / max(terms.denominator, 1e-9)
        loss.backward()

    dt, peak, step_gb = peak_of(chunked)
    rec.fig("chunked_step_s", dt)
    rec.fig("peak_chunked_gb", peak)
    rec.fig("step_chunked_gb", step_gb)
    try:
        dt, peak, step_gb = peak_of(full)
        rec.fig("full_step_s", dt)
        rec.fig("peak_full_gb", peak)
        rec.fig("step_full_gb", step_gb)
    except torch.cuda.OutOfMemoryError:
        total = torch.cuda.get_device_properties(0).total_memory / 1e9
        rec.fig("peak_full_gb", -1.0)
        rec.note(f"full logits: out of memory (> {total:.0f} GB on this GPU)")
    kd.optimizer.zero_grad(set_to_none=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def part_multi_gpu(s: Session) -> None:
    """`--parallel tp` over 2 GPUs under torchrun against the single-GPU cache (fp32: equality; bf16: rows/s)."""
    import torch

    from pipeline.cache import open_cache

    n = torch.cuda.device_count() if s.cuda else 0
    if n < 2:
        rec_why = (f"needs >= 2 GPUs, this machine has {n}; the same tensor-parallel path runs on CPU with gloo "
                   "in tests/teacher/test_teacher_parallel.py")
        s.rec.skip(rec_why)
        return
    z, rec = s.sizes, s.rec
    kdcache = str(Path(sys.executable).with_name("kdcache"))
    if not Path(kdcache).is_file():
        raise FileNotFoundError(f"{kdcache}: the kdcache script is not installed beside this Python (pip install -e .)")

    def cli(data: Path, model: Path, out: Path, dtype: str, tp: bool) -> float:
        shutil.rmtree(out, ignore_errors=True)
        cmd = [kdcache, "teacher", "--data", str(data), "--model", str(model), "--out", str(out), "--device", "cuda",
               "--dtype", dtype]
        if tp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(_free_port()), *cmd, "--parallel", "tp"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=max(10.0, s.left() - 5), stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    small = llama_teacher(s, "small", z.small, "float32", z.small_seq)
    data = synthetic_data(s, "small", z.small["vocab"], z.small_seqs, z.small_seq, seed=2)
    cli(data, small, s.work / "tp_single_fp32", "float32", tp=False)
    cli(data, small, s.work / "tp_fp32", "float32", tp=True)
    c = compare_caches(s.work / "tp_single_fp32", s.work / "tp_fp32")
    rec.fig("tp_same_set", c["same_set"])
    rec.fig("tp_max_dlogp", c["max_dlogp"])
    big = llama_teacher(s, "big", z.big, "bfloat16", z.big_seq)
    data = synthetic_data(s, "big", z.big["vocab"], z.big_seqs, z.big_seq, seed=0)
    t1 = cli(data, big, s.work / "tp_single_bf16", "bfloat16", tp=False)
    rows = open_cache(s.work / "tp_single_bf16").num_rows
    rec.fig("single_rows_s", rows / t1)
    t2 = cli(data, big, s.work / "tp_bf16", "bfloat16", tp=True)
    rec.fig("tp_rows_s", rows / t2)


def quality_config(s: Session) -> dict[str, Any]:
    """configs/bench-quality.yaml with one seed on the suite's device (--smoke: tiny models, three students)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "bench-quality.yaml").read_text())
    cfg["out"] = str(s.work / "quality")
    cfg["seeds"] = [0]

    def absolute(section: dict[str, Any]) -> None:
        if "student_config" in section and not Path(section["student_config"]).is_absolute():
            section["student_config"] = str(REPO / section["student_config"])

    if s.args.smoke:
        def tiny(name: str, hidden: int, layers: int) -> str:
            p = s.work / f"quality_{name}.json"
            p.write_text(json.dumps({"model_type": "llama", "vocab_size": 512, "hidden_size": hidden,
                                     "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                                     "num_attention_heads": 2, "num_key_value_heads": 1,
                                     "max_position_embeddings": 256, "tie_word_embeddings": True}))
            return str(p)

        import sysconfig

        # One stdlib package (29 files) instead of all 732: the corpus and its tokenizer in ~1 s instead of ~12 s.
        cfg["corpus"].update(vocab_size=512, stdlib=str(Path(sysconfig.get_paths()["stdlib"]) / "email"), heldout_every=5)
        for split, n, length in (("text", 200, 64), ("train", 60, 64), ("heldout", 12, 256)):
            cfg["prepare"][split].update(max_examples=n, max_length=length)
        cfg["stages"] = [st for st in cfg["stages"] if st != "report"]  # its plots take seconds; nothing device-specific
        cfg["teachers"] = {"large": cfg["teachers"]["large"]}
        cfg["teachers"]["large"]["train"].update(student_config=tiny("teacher", 16, 1), max_steps=2)
        cfg["train_defaults"].update(student_config=tiny("student", 8, 1), max_steps=2, batch_tokens=512)
        cfg["students"] = {k: dict(cfg["students"][k]) for k in ("warm_start", "ce_only", "kd_fkl")}
        cfg["students"]["warm_start"]["max_steps"] = 2
        cfg["eval"].update(generate=2, batch_size=8)
    for t in cfg["teachers"].values():
        t["device"] = s.device
        t["train"]["device"] = s.device
        absolute(t["train"])
    cfg["train_defaults"]["device"] = s.device
    absolute(cfg["train_defaults"])
    for st in cfg["students"].values():
        absolute(st)
    cfg["eval"]["device"] = s.device
    return cfg


def part_quality(s: Session) -> None:
    """The quality benchmark, one seed, on the device; progress is recorded as it goes (the part may run out of
    time: a re-run with the same --work continues where it stopped)."""
    import yaml

    from pipeline.run import Pipeline, load_run_config, select_stages

    rec = s.rec
    cfg = quality_config(s)
    path = s.work / "quality.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = Path(cfg["out"])
    total = len(cfg["students"]) * len(cfg["seeds"])
    rec.fig("students_total", total)
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        rec.note(line)
        rec.fig("wall_s", time.perf_counter() - t0)
        rec.fig("students_trained", len(list(out.glob("students/*/final"))))
        rec.fig("students_evaluated", len(list(out.glob("students/*/eval/eval.json"))))

    rc = load_run_config(str(path))
    Pipeline(rc, echo=progress, progress=False).run(select_stages(rc, None, None))
    progress("run: done")
    ce = {p.parts[-3]: json.loads(p.read_text())["ce"] for p in sorted(out.glob("students/*/eval/eval.json"))}
    rec.fig("heldout_ce", ce)
    rec.fig("teacher_ce", {p.parts[-3]: json.loads(p.read_text())["ce"]
                           for p in sorted(out.glob("teachers/*/eval/eval.json"))})
    report = out / "report" / "report.md"
    if report.is_file():
        shutil.copy(report, s.out / "quality_report.md")
        rec.note(f"report: {s.out / 'quality_report.md'}")


PART_FUNCS: dict[str, Callable[[Session], None]] = {
    "cuda_paths": part_cuda_paths, "teacher": part_teacher, "fidelity": part_fidelity, "real_llm": part_real_llm,
    "student": part_student, "multi_gpu": part_multi_gpu, "quality": part_quality}


# ---- running the parts ----------------------------------------------------------------------------------

def probe(s: Session) -> dict[str, Any]:
    """Versions and the device (in a child: the parent keeps CUDA uninitialised)."""
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "cuda": torch.version.cuda, "device": s.device}
    if s.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 1e9, 1))
    else:
        info.update(gpu=None, gpu_count=0)
    return info


def run_child(name: str, fn: Callable[[Session], Any], s: Session, part: Part, budget: float,
              grace_s: float = 5.0) -> dict[str, Any]:
    """Run fn(s) in a forked child, killed (with its process group) `grace_s` after its budget; -> the part's record:
    status (ok | skipped | error | over budget), seconds, budget_s, figures, notes, error (one line), traceback."""
    path = s.out / "parts" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: its own process group, so a kill takes its subprocesses too
        code = 0
        try:
            os.setpgrp()
            _die_with_parent()
            s.rec = Recorder(path, part)
            s.deadline = t0 + budget
            res = fn(s)
            if res is not None:
                s.rec._write({"result": res})
        except BaseException as e:  # noqa: BLE001 - recorded, the suite goes on
            line = (str(e).strip().splitlines() or [""])[0]
            Recorder(path, part)._write({"error": f"{type(e).__name__}: {line}"[:400],
                                         "traceback": traceback.format_exc()[-4000:]})
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    killed = False
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > budget + grace_s:
                _kill_group(pid)
                os.waitpid(pid, 0)
                killed, status = True, 0
                break
            time.sleep(0.1)
    except BaseException:
        _kill_group(pid)
        raise
    rec: dict[str, Any] = {"status": "ok", "seconds": round(time.monotonic() - t0, 1), "budget_s": round(budget),
                           "figures": {}, "notes": []}
    for line in path.read_text().splitlines() if path.is_file() else []:
        ev = json.loads(line)
        if "fig" in ev:
            rec["figures"][ev["fig"]] = ev["value"]
        elif "note" in ev:
            rec["notes"].append(ev["note"])
        elif "skipped" in ev:
            rec["status"], rec["skipped"] = "skipped", ev["skipped"]
        elif "error" in ev:
            rec["status"], rec["error"], rec["traceback"] = "error", ev["error"], ev["traceback"]
        elif "result" in ev:
            rec["result"] = ev["result"]
    if killed:
        rec["status"], rec["error"] = "over budget", f"killed after {budget:.0f} s (its budget); figures so far kept"
    elif os.WIFSIGNALED(status):
        rec["status"], rec["error"] = "error", f"died of signal {os.WTERMSIG(status)}"
    elif os.WEXITSTATUS(status) and rec["status"] == "ok":
        rec["status"], rec["error"] = "error", f"exit status {os.WEXITSTATUS(status)}"
    return rec


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the suite's process dies (e.g. a device tool's timeout), so that no part goes on
    holding the GPU on its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- output ---------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) or "—"
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 1 or a == 0:
            return f"{v:.3f}".rstrip("0").rstrip(".") if a < 100 else f"{v:.1f}"
        if a >= 1e-3:
            return f"{v:.4f}"
        return f"{v:.2e}"
    return str(v)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return text.replace("\n", " ").replace("|", "\\|")


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    gpu = f"{env.get('gpu')} ({env.get('gpu_count')} GPU)" if env.get("gpu") else f"no GPU, device {env.get('device')}"
    lines = [f"### GPU suite, {res['date']}{' (smoke: tiny sizes, numbers meaningless)' if res['smoke'] else ''}", "",
             f"`{res['command']}` on {gpu}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"CUDA {env.get('cuda')}, Python {env.get('python')}, kdcache {res['commit']}; "
             f"{res['wall_s']:.0f} s of a {res['budget_s']} s budget.", "",
             "| part | status | s / budget | note |", "|---|---|---:|---|"]
    for name, p in res["parts"].items():
        note = p.get("error") or p.get("skipped") or "; ".join(p["notes"][-2:])
        lines.append(f"| {name} | {p['status']} | {p['seconds']:.0f} / {p['budget_s']} | {_cell(note)} |")
    lines += ["", "| part | figure | value |", "|---|---|---:|"]
    labels = {(pt.name, k): lab for pt in PARTS for k, lab in pt.figures}
    for name, p in res["parts"].items():
        for k, v in p["figures"].items():
            lines.append(f"| {name} | {_cell(labels.get((name, k), k))} | {_cell(_fmt(v))} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, res: dict[str, Any]) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(res, indent=1, default=_jsonable) + "\n")
    (out / "gpu_suite.md").write_text(markdown(res))


def dry_run(parts: list[Part], smoke: bool, total: int) -> str:
    lines = [f"GPU suite: {len(parts)} parts, {total} s in all{' (smoke: tiny sizes on the CPU)' if smoke else ''}; "
             "nothing is run.", ""]
    for p in parts:
        lines.append(f"part {p.name} (budget {p.smoke_budget_s if smoke else p.budget_s} s): {p.what}")
        lines += [f"    {k}: {lab}" for k, lab in p.figures]
    lines += ["", "docs/benchmarks.md, 'Not yet measured': each figure and the part that measures it:"]
    for label, part, keys in NOT_YET_MEASURED:
        lines.append(f"  - {label} -> part {part} ({', '.join(keys)})")
    return "\n".join(lines)


def preload() -> None:
    """Import what the parts use before forking them, so that each part does not import it again (seconds each on
    a busy CPU). Nothing here touches CUDA. A module that fails to import is left to the part that needs it."""
    import importlib

    for name in ("transformers.models.llama.modeling_llama", "accelerate", "pipeline.teacher.runner",
                 "pipeline.teacher.worker", "pipeline.cache", "pipeline.data.prepare", "pipeline.training.trainer",
                 "pipeline.run", "teacher", "student", "fidelity"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the part reports it
            pass


def commit_id() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="where gpu_suite.json, gpu_suite.md and parts/*.jsonl go")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, every part, < 1 minute")
    ap.add_argument("--dry-run", action="store_true", help="list the parts, budgets and figures; run nothing")
    ap.add_argument("--only", default="", help=f"comma list of parts ({', '.join(PART_NAMES)})")
    ap.add_argument("--budget-s", type=int, default=0, help=f"the whole suite's time (default {TOTAL_BUDGET_S}; smoke 300)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: cuda when available (--smoke: cpu)")
    ap.add_argument("--real-llm", default="", help="a local Hugging Face directory of a small LLM (e.g. SmolLM2-135M)")
    ap.add_argument("--work", default="", help="models, data and caches (default: a temporary directory, removed)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak for MFU (default: from the GPU's name, bench/teacher.py PEAK_TFLOPS)")
    args = ap.parse_args(argv)
    only = [x for x in args.only.split(",") if x]
    bad = [x for x in only if x not in PART_NAMES]
    if bad:
        ap.error(f"--only: unknown part(s) {', '.join(bad)}; parts are {', '.join(PART_NAMES)}")
    parts = [p for p in PARTS if not only or p.name in only]
    total = args.budget_s or (300 if args.smoke else TOTAL_BUDGET_S)
    if args.dry_run:
        print(dry_run(parts, args.smoke, total))
        return 0
    if not args.out:
        ap.error("--out DIR is required (except with --dry-run)")
    import datasets  # imported before forking, so each part starts without re-importing them
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    preload()

    device = args.device
    if device == "auto":
        device = "cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "")
    if not device:
        ap.error("no GPU found: run the CPU smoke (--smoke) or pass --device cpu to run the full sizes on the CPU (hours)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kdcache-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = sizes_for(args.smoke)
    s = Session(args=args, sizes=sizes, device=device, work=work, out=out)
    command = "python bench/gpu_suite.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.monotonic()
    res: dict[str, Any] = {"suite": "bench/gpu_suite.py", "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                           "command": command, "smoke": args.smoke, "commit": commit_id(), "budget_s": total,
                           "sizes": sizes.__dict__, "env": {}, "parts": {}, "wall_s": 0.0}
    probe_part = Part("probe", 60, 60, "versions and device", ())
    pr = run_child("probe", probe, s, probe_part, 120)
    res["env"] = pr.get("result") or {"device": device, "error": pr.get("error")}
    import teacher as teacher_bench

    peak = args.peak_tflops or sizes.peak_tflops
    gpu = res["env"].get("gpu") or ""
    if not args.peak_tflops and gpu:
        peak = next((v for k, v in teacher_bench.PEAK_TFLOPS.items() if k in gpu), None)
    s.info["peak_tflops"] = peak
    res["env"]["peak_tflops"] = peak
    if args.smoke and not args.peak_tflops and not gpu:
        res["env"]["peak_tflops_note"] = "nominal 1 TFLOP/s (smoke): MFU figures check the arithmetic only"
    print(f"GPU suite: device {device} {gpu}, {len(parts)} parts, {total} s budget, work {work}", file=sys.stderr)
    try:
        for p in parts:
            left = total - (time.monotonic() - t_start)
            budget = min(p.smoke_budget_s if args.smoke else p.budget_s, left)
            if budget < 20:
                res["parts"][p.name] = {"status": "skipped", "skipped": f"out of time ({left:.0f} s of the suite left)",
                                        "seconds": 0.0, "budget_s": 0, "figures": {}, "notes": []}
            else:
                print(f"--- part {p.name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
                res["parts"][p.name] = run_child(p.name, PART_FUNCS[p.name], s, p, budget)
            r = res["parts"][p.name]
            res["wall_s"] = time.monotonic() - t_start
            write_outputs(out, res)
            print(f"--- part {p.name}: {r['status']} in {r['seconds']:.0f} s"
                  + (f": {r.get('error') or r.get('skipped')}" if r["status"] != "ok" else ""), file=sys.stderr, flush=True)
            for k, v in r["figures"].items():
                print(f"{p.name}.{k} = {_fmt(v)}", flush=True)
    finally:
        res["wall_s"] = time.monotonic() - t_start
        write_outputs(out, res)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(res))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
