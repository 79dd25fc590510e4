"""Cache figures on a real pretrained LLM (SmolLM2-135M-Instruct, V = 49,152) over this machine's doc texts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_llm.py --measure [--records 64]     # ~10 min on 2 cores

For the default preset and each larger setting (K = 16 and 32, default and hifi precisions, 8 tail draws):
bytes/row in all and per array; the teacher stage's wall time against a bare forward of the same model over the
same examples (full [L, V] logits, no cache: the least any teacher pass can cost); and every cached quantity
against the float64 full-softmax teacher (final hidden states of the float32 forward, head applied in float64):
head log-probs, tail mass, entropy, tail power sums at the grid temperatures and the target log-prob, as max
(and median) absolute errors. Writes ROOT/measure.json and prints a Markdown table.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = (  # (label, TeacherConfig overrides): the named presets, and settings spelled out from compact's precisions
    ("compact (K=8)", {"preset": "compact"}),
    ("default (K=6 + 4 draws)", {"preset": "default"}),
    ("K=8 + 4 draws", {"preset": "compact", "tail_samples": 4}),
    ("K=6 + 4 draws, draw step 2^-6", {"preset": "compact", "top_k": 6, "tail_samples": 4}),
    ("K=8 + 8 draws", {"preset": "compact", "tail_samples": 8}),
    ("K=16", {"preset": "compact", "top_k": 16}),
    ("hifi (K=16 + 8 draws)", {"preset": "hifi"}),
    ("hifi K=32, no draws", {"preset": "hifi", "top_k": 32, "tail_samples": 0}),
)


def load_examples(prepared: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from pipeline.data.prepare import load_prepared

    ds = load_prepared(prepared).with_format("numpy")
    return ([np.asarray(r["input_ids"], dtype=np.int64) for r in ds],
            [np.asarray(r["loss_mask"], dtype=np.int8) for r in ds])


@torch.no_grad()
def bare_forward_seconds(model: Any, ids: list[np.ndarray]) -> float:
    """One forward per example with the model's full [L, V] logits: the teacher's work without any caching."""
    t0 = time.perf_counter()
    for x in ids:
        model(input_ids=torch.as_tensor(x)[None]).logits.float()
    return time.perf_counter() - t0


@torch.no_grad()
def reference_rows(model: Any, ids: list[np.ndarray], masks: list[np.ndarray], vocab: int, betas: np.ndarray):
    """Float64 statistics of each example's target rows (cache order): yields dicts of [n, ...] arrays."""
    w = model.get_output_embeddings().weight.double()[:vocab]
    for x, m in zip(ids, masks):
        t = np.nonzero(m)[0]
        t = t[t >= 1]
        if not len(t):
            continue
        hidden = model.base_model(input_ids=torch.as_tensor(x)[None]).last_hidden_state[0].double()
        logp = torch.log_softmax(hidden[torch.as_tensor(t - 1)] @ w.T, dim=-1)
        p = logp.exp()
        b = torch.as_tensor(betas)[:, None, None]
        yield {"logp": logp, "entropy": -(p * logp).sum(-1), "target": torch.as_tensor(x[t]),
               "log_partition": torch.logsumexp(b * logp[None], dim=-1).T}


class Errors:
    """Running |cached - float64| per quantity for one cache (`add` one example's rows at a time)."""

    def __init__(self, cache: Any):
        self.cache, self.row, self.order_gap = cache, 0, 0.0
        self.errs: dict[str, list[np.ndarray]] = {k: [] for k in ("topk_logprobs", "tail_logprob_rel", "entropy",
                                                                  "log_partition", "target_logprobs")}

    def add(self, ref: dict[str, torch.Tensor]) -> None:
        n = len(ref["entropy"])
        got = self.cache.read(self.row, self.row + n, ("topk_ids", "topk_logprobs", "tail_logprob", "entropy",
                                                       "log_partition", "target_logprobs"))
        self.row += n
        logp = ref["logp"]
        top = torch.as_tensor(got["topk_ids"])
        ref_head = logp.gather(1, top)
        # the cached ids are the float64 top-K in descending order, up to float32 ties: the largest log-prob
        # by which a cached id is out of order or below the float64 K-th
        kth = logp.topk(self.cache.k, dim=-1).values[:, -1:]
        self.order_gap = max(self.order_gap, float((ref_head[:, 1:] - ref_head[:, :-1]).max()) if self.cache.k > 1 else 0.0,
                             float((kth - ref_head).max()))
        e = self.errs
        e["topk_logprobs"].append((torch.as_tensor(got["topk_logprobs"]).double() - ref_head).abs().max(1).values.numpy())
        in_head = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, top, True)
        r = torch.logsumexp(logp.masked_fill(in_head, -torch.inf), dim=-1)
        e["tail_logprob_rel"].append((torch.as_tensor(got["tail_logprob"]).double() - r).abs().numpy())
        e["entropy"].append((torch.as_tensor(got["entropy"]).double() - ref["entropy"]).abs().numpy())
        e["log_partition"].append((torch.as_tensor(got["log_partition"]).double()
                                   - ref["log_partition"]).abs().max(1).values.numpy())
        e["target_logprobs"].append((torch.as_tensor(got["target_logprobs"]).double()
                                     - logp.gather(1, ref["target"][:, None])[:, 0]).abs().numpy())

    def summary(self) -> dict[str, dict[str, float]]:
        """Max and median per quantity over every row of the cache; exits when the rows or ids disagree."""
        if self.row != self.cache.num_rows:
            raise SystemExit(f"reference has {self.row} rows, the cache {self.cache.num_rows}")
        if self.order_gap > 1e-4:
            raise SystemExit(f"cached top-K ids are not the float64 teacher's top-K (off by {self.order_gap:.2g})")
        out = {k: {"max": float(np.concatenate(v).max()), "median": float(np.median(np.concatenate(v)))}
               for k, v in self.errs.items()}
        out["id_order"] = {"max": self.order_gap, "median": 0.0}
        return out


def main(root: Path, teacher: Path, records: int, only: list[str] | None = None) -> dict[str, Any]:
    """Measure SETTINGS (or those whose labels start with one of `only`) and write ROOT/measure.json."""
    import real_llm
    from transformers import AutoModelForCausalLM

    from pipeline.cache import open_cache
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prepared = real_llm.ensure_prepared(teacher, root / "prepared_docs", records=records)
    ids, masks = load_examples(prepared)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    out: dict[str, Any] = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                           "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/real_llm.py --measure "
                                      + shlex.join(sys.argv[sys.argv.index("--measure") + 1:]
                                                   if "--measure" in sys.argv else []),
                           "records": records, "examples": len(ids), "tokens": int(sum(map(len, ids))),
                           "targets": int(sum(int(m[1:].sum()) for m in masks)), "settings": {}}
    bare = bare_forward_seconds(model, ids)
    out["bare_forward_s"] = bare
    caches = {}
    chosen = [(lab, over) for lab, over in SETTINGS if not only or any(lab.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"no setting starts with {only}; settings: {[lab for lab, _ in SETTINGS]}")
    for label, over in chosen:
        cdir = root / "caches" / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p")
        shutil.rmtree(cdir, ignore_errors=True)  # timed from nothing: a resumed cache would skip its shards
        cfg = TeacherConfig(data=str(prepared), model=str(teacher), out=str(cdir), device="cpu", dtype="float32",
                            threads=torch.get_num_threads(), **over)
        t0 = time.perf_counter()
        run_teacher(cfg)
        secs = time.perf_counter() - t0
        cache = caches[label] = open_cache(cdir)
        arrays = {k: v / cache.num_rows for k, v in cache.array_bytes().items()}
        out["settings"][label] = {"bytes_per_row": cache.bytes_on_disk() / cache.num_rows, "arrays": arrays,
                                  "teacher_s": secs, "teacher_over_bare": secs / bare, "rows": cache.num_rows,
                                  "entropy_bits": cache.params.entropy_bits}
        print(f"{label}: {cache.bytes_on_disk() / cache.num_rows:.2f} B/row, teacher {secs:.0f}s "
              f"({secs / bare:.2f}x bare)", file=sys.stderr, flush=True)
    # One float64 reference pass, every cache compared with it (all caches share the grid temperatures).
    first = next(iter(caches.values()))
    errs = {label: Errors(c) for label, c in caches.items()}
    for ref in reference_rows(model, ids, masks, first.vocab_size, np.asarray([1.0 / t for t in first.temperatures])):
        for e in errs.values():
            e.add(ref)
    for label, e in errs.items():
        out["settings"][label]["errors"] = e.summary()
    # settings measured by earlier runs are kept (each carries its own date and command)
    for label, st in out["settings"].items():
        st.update(date=out["date"], command=out["command"])
    old = root / "measure.json"
    if old.is_file():
        out["settings"] = {**json.loads(old.read_text()).get("settings", {}), **out["settings"]}
    (root / "measure.json").write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
    return out


def markdown(m: dict[str, Any]) -> str:
    names = sorted({a for s in m["settings"].values() for a in s["arrays"]})
    head = (f"SmolLM2-135M-Instruct, {m['examples']} doc texts, {m['tokens']:,} tokens, {m['targets']:,} target rows "
            f"({m['date']}, `{m['command']}`); bare forward {m['bare_forward_s']:.0f} s.")
    lines = [head, "",
             "| setting | bytes/row | " + " | ".join(names) + " | teacher stage / bare forward |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for label, s in m["settings"].items():
        lines.append(f"| {label} | {s['bytes_per_row']:.2f} | "
                     + " | ".join(f"{s['arrays'].get(a, 0.0):.2f}" for a in names)
                     + f" | {s['teacher_over_bare']:.2f} |")
    cols = "| setting | head log p max | tail log r max | entropy max (median) | log A(b) max | target log p max | entropy bits |"
    lines += ["", cols, "|---|---|---|---|---|---|---|"]
    for label, s in m["settings"].items():
        e = s["errors"]
        lines.append(f"| {label} | {e['topk_logprobs']['max']:.4f} | {e['tail_logprob_rel']['max']:.5f} | "
                     f"{e['entropy']['max']:.4f} ({e['entropy']['median']:.5f}) | {e['log_partition']['max']:.4f} | "
                     f"{e['target_logprobs']['max']:.4f} | {s['entropy_bits']} |")
    return "\n".join(lines)
