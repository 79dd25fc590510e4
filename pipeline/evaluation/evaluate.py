"""Stage 3: score a (student) model on prepared data, against the teacher cache when one is given.

    kdcache eval --model runs/demo/kd/final --data runs/demo/prepared --cache runs/demo/cache --out runs/demo/kd/eval

Writes OUT/eval.json and OUT/config.yaml. Figures, all over every target position of the data:

- `ce` (nats per target token) and `ppl = exp(ce)`;
- with a cache of the same data: `teacher_top1_agreement` (student argmax = teacher's top-1 id) and
  `fkl_to_teacher`, forward KL(P_teacher || Q_student) on the K + 1 buckets at T = 1 (methods.md §2);
- with `generate = N` on prompt-response or chat data: greedy generations for the first N examples,
  scored by `exact_match` (stripped string equality) and `rouge_l` (ROUGE-L F-measure), plus a few
  samples. The reference is the example's last run of target tokens (the response; in a chat, the
  last assistant turn), the prompt everything before it (in a chat, the conversation so far and the
  template's opening of the assistant turn).

Examples are batched (right padding) in dataset order and the output head runs only at target
positions and a chunk of rows at a time (`TargetLogits.hidden`, `HeadSpec.logits`), so peak memory does
not grow with targets-per-batch x vocabulary; the
metrics are then computed in float64 over row chunks of at most `ROW_CHUNK_ELEMENTS` logits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.cache.rows import target_positions
from pipeline.config import save_config
from pipeline.errors import KdError
from pipeline.identity import write_json
from pipeline.models import resolve_model_path
from pipeline.ownership import EVAL, Output, amend, claim
from pipeline.storage import is_url, join
from pipeline.training.held_out import EVAL_FIELDS, ROW_CHUNK_ELEMENTS, Totals, bucket_fkl, score  # noqa: F401

log = logging.getLogger(__name__)

EVAL_FILENAME = "eval.json"

@dataclass
class EvalConfig:
    """Settings of `kdcache eval`."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("cache", "data", "out", "model")  # may be an fsspec URL (pipeline.storage)

    model: str = ""  # model directory (a run directory means its final/), or hub id
    data: str = ""  # prepared data; may be omitted when the cache records where it lives
    cache: str = ""  # teacher cache of the same data: adds top-1 agreement and FKL to the teacher
    out: str = ""
    generate: int = 0  # greedy generations on the first N examples (prompt-response or chat data)
    extra_new_tokens: int = 16  # generation budget = reference length + this
    samples: int = 3  # generations copied into eval.json
    batch_size: int = 8  # sequences per forward pass
    device: str = "auto"
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise KdError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in ("generate", "extra_new_tokens", "samples"):
            if getattr(self, name) < 0:
                raise KdError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise KdError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


# ---- generation ----------------------------------------------------------------------------
def score_generations(references: list[str], generations: list[str]) -> dict[str, Any]:
    """Exact match (stripped equality) and ROUGE-L F-measure, per pair and averaged.

    ROUGE-L is over rouge_score's default word tokens (lower-cased runs of letters and digits: on code, the
    identifiers, keywords and numbers; punctuation is not scored), no stemming.
    Returns {"exact_match": mean, "rouge_l": mean, "per_example": [(em, rouge_l), ...]}.
    """
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import DefaultTokenizer

    if len(references) != len(generations):
        raise ValueError(f"{len(references)} references but {len(generations)} generations")
    # The tokenizer given explicitly: left to default, rouge_score logs "Using default tokenizer." per call.
    scorer = RougeScorer(["rougeL"], tokenizer=DefaultTokenizer(use_stemmer=False))
    per = [(float(r.strip() == g.strip()), float(scorer.score(r, g)["rougeL"].fmeasure))
           for r, g in zip(references, generations)]
    n = max(len(per), 1)
    return {"exact_match": sum(e for e, _ in per) / n, "rouge_l": sum(r for _, r in per) / n, "per_example": per}


def split_prompt_reference(ids: np.ndarray, mask: np.ndarray, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, reference ids) of a prepared example.

    The reference is the last run of consecutive target positions, cut at its last EOS (the end of
    the response or of the last assistant turn; chat templates may close a turn with more tokens
    after it); the prompt is every token before that run. Prompt-response data has one run: the
    response. ids [L] and mask [L] int arrays of one example.
    """
    t = target_positions(mask)
    if len(t) == 0:
        return ids, ids[:0]
    gaps = np.nonzero(np.diff(t) != 1)[0]
    start = int(t[gaps[-1] + 1]) if len(gaps) else int(t[0])
    ref = ids[start: int(t[-1]) + 1]
    if eos_id is not None:
        ends = np.nonzero(ref == eos_id)[0]
        if len(ends):
            ref = ref[: ends[-1]]
    return ids[:start], ref


def generate_examples(model: Any, tokenizer: Any, ds: Any, n: int, extra_new_tokens: int, device: torch.device,
                      context: int | None, progress: bool = False) -> list[dict[str, str]]:
    """Greedy generations for the first `n` examples: [{prompt, reference, generation}]."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids_col, mask_col = ds.data.column("input_ids"), ds.data.column("loss_mask")
    idx = range(min(n, len(ds)))
    if progress:
        from tqdm import tqdm

        idx = tqdm(idx, desc="generate", unit="ex", leave=False)
    out = []
    for e in idx:
        ids = np.asarray(ids_col[e].values, dtype=np.int64)
        prompt, ref = split_prompt_reference(ids, np.asarray(mask_col[e].values), eos)
        budget = len(ref) + extra_new_tokens
        if context is not None:
            budget = min(budget, context - len(prompt))
        gen_text = ""
        if budget > 0 and len(prompt) > 0:
            x = torch.as_tensor(prompt, device=device)[None]
            with torch.no_grad():
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=budget,
                                   do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
            gen_text = tokenizer.decode(y[0, x.shape[1]:].tolist(), skip_special_tokens=True)
        out.append({"prompt": tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                    "reference": tokenizer.decode(ref.tolist(), skip_special_tokens=True),
                    "generation": gen_text})
    return out


# ---- the stage -----------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Score `cfg.model` on `cfg.data` (see the module docstring); writes OUT/eval.json, returns its dict."""
    if not cfg.out:
        raise KdError("no output directory given (--out DIR)")
    if not cfg.model:
        raise KdError("no model given (--model PATH_OR_ID)")
    if is_url(cfg.out):
        return _evaluate_to_url(cfg, progress)
    # Before any work: the lock, and every file in OUT checked to be eval's (a re-run replaces only its own).
    with claim(cfg.out, EVAL) as own:
        return _evaluate(cfg, progress, own)


EVAL_FILES = ("config.yaml", EVAL_FILENAME)  # what an evaluation writes, eval.json last


def _evaluate_to_url(cfg: EvalConfig, progress: bool) -> dict[str, Any]:
    """--out at an fsspec URL: evaluated in a local staging directory, then uploaded with eval.json last, so a URL
    holding eval.json holds a whole evaluation (`publish`: anything else there refuses before any work)."""
    from pipeline.storage.staging import publish

    def make(local: Path) -> dict[str, Any]:
        with claim(str(local), EVAL) as own:
            return _evaluate(cfg, progress, own, local)

    return publish(cfg.out, "eval", EVAL_FILES, make)


def _evaluate(cfg: EvalConfig, progress: bool, own: Output, write_to: Path | None = None) -> dict[str, Any]:
    """The evaluation, written to `write_to` (default: --out; a staging directory when --out is a URL, while
    config.yaml and the model card name --out)."""
    from pipeline.cache import open_cache
    from pipeline.models import context_length, load_causal_lm, pick_device, pick_dtype
    from pipeline.data.prepare import load_prepared, prepared_meta
    from pipeline.training.student import check_inputs

    out = Path(write_to or cfg.out)
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache) if cfg.cache else None
    data = cfg.data or (cache.meta["data"]["path"] if cache is not None else "")
    if not data:
        raise KdError("no data given (--data DIR, a `kdcache prepare` output)")
    pmeta = prepared_meta(data)
    ds = load_prepared(data)
    if cfg.generate and pmeta["format"] not in ("prompt-response", "chat"):
        raise KdError(f"--generate needs prompt-response or chat data; {data} is {pmeta['format']!r}")

    device = pick_device(cfg.device)
    model_path = resolve_model_path(cfg.model)
    tokenizer = _matching_tokenizer(model_path, pmeta, needed=bool(cfg.generate))  # before the weights load
    model = load_causal_lm(model_path, device, pick_dtype(cfg.dtype, device))
    check_inputs(model, pmeta, cache)  # vocabulary; with a cache: complete, same tokenizer, same data
    ctx = context_length(model)
    longest = _longest(ds)
    if ctx is not None and longest > ctx:
        raise KdError(f"{data} has an example of {longest} tokens, longer than the model's context of {ctx}")

    figures = score(model, ds, cache, cfg.batch_size, device, progress=progress)

    result: dict[str, Any] = {"model": cfg.model, "data": str(data), "cache": cfg.cache or None,
                              "examples": len(ds), **figures}
    if cfg.generate:
        gens = generate_examples(model, tokenizer, ds, cfg.generate, cfg.extra_new_tokens, device, ctx, progress)
        scores = score_generations([g["reference"] for g in gens], [g["generation"] for g in gens])
        result.update({"generated": len(gens), "exact_match": scores["exact_match"], "rouge_l": scores["rouge_l"],
                       "samples": [{**g, "exact_match": em, "rouge_l": rl}
                                   for g, (em, rl) in list(zip(gens, scores["per_example"]))[: cfg.samples]]})
    result["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    own.writing("config.yaml", EVAL_FILENAME)
    save_config(cfg, out / "config.yaml")
    write_json(out / EVAL_FILENAME, result)
    from pipeline.training.model_card import CARD_FILENAME, refresh_card

    if not is_url(cfg.model) and refresh_card(model_path, {**result, "eval_json": eval_json(cfg.out)}):  # a kdcache-trained model only
        amend(Path(model_path) / CARD_FILENAME)  # the run's record of its card follows the new figures
        log.info("eval: added these figures to the model card %s", Path(model_path) / "README.md")
    return result


def _longest(ds: Any) -> int:
    """Tokens in the longest example (from the Arrow offsets: no Python loop over rows)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.data.column("input_ids"))
    return int(pc.max(lengths).as_py() or 0)


def _matching_tokenizer(model_path: str, pmeta: dict[str, Any], needed: bool) -> Any | None:
    """The model's own tokenizer, refused (one line naming both) when it is not the one the data was prepared with.

    Checked whenever the model directory carries a tokenizer: scores of a model on ids tokenized for
    another vocabulary are meaningless. A hub model's tokenizer is loaded only when `needed` (to
    decode generations). A directory without tokenizer files (a bare checkpoint) decodes with the
    data's tokenizer, which is by construction the right one. None when not needed and not present.
    """
    from pipeline.identity import describe_tokenizer, same_tokenizer, tokenizer_identity
    from pipeline.models import has_tokenizer_files, is_gguf, load_tokenizer

    local = Path(model_path).expanduser()
    if has_tokenizer_files(local) if local.is_dir() or is_gguf(local) else needed:  # a .gguf carries its tokenizer
        try:
            tok = load_tokenizer(model_path)
        except KdError as e:
            raise KdError(f"--generate needs a tokenizer to decode with: {e}" if needed else str(e)) from None
        own = tokenizer_identity(tok, model_path)
        if not same_tokenizer(own, pmeta["tokenizer"]):
            raise KdError(f"the model's tokenizer {describe_tokenizer(own)} is not the one the data was prepared "
                          f"with, {describe_tokenizer(pmeta['tokenizer'])}: its scores on these ids would be "
                          "meaningless; prepare the data with the model's tokenizer")
        return tok
    if not needed:
        return None
    try:
        return load_tokenizer(pmeta["tokenizer"]["name"])
    except KdError as e:
        raise KdError(f"--generate needs a tokenizer to decode with: {e}") from None


def eval_json(out: str) -> str:
    """Where an evaluation at --out `out` (a directory or a URL) keeps its eval.json."""
    return join(out, EVAL_FILENAME) if is_url(out) else str(Path(out) / EVAL_FILENAME)


def summary_line(r: dict[str, Any], out: str) -> str:
    """One line for the end of `kdcache eval`."""
    parts = [f"eval: {r['targets']:,} targets, ce {r['ce']:.4f} (ppl {r['ppl']:.2f})"]
    if "teacher_top1_agreement" in r:
        parts.append(f"teacher top-1 agreement {r['teacher_top1_agreement']:.3f}, fkl {r['fkl_to_teacher']:.4f}")
    if "exact_match" in r:
        parts.append(f"exact match {r['exact_match']:.3f}, ROUGE-L {r['rouge_l']:.3f} on {r['generated']}")
    return ", ".join(parts) + f" in {r['seconds']:.1f}s -> {eval_json(out)}"
