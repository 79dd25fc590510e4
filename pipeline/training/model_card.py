"""The model card of a trained student: OUT/final/README.md in the Hugging Face layout.

    kdcache train ... --out runs/kd          # writes runs/kd/final/README.md with the model
    kdcache eval --model runs/kd ...         # adds its figures to that card

YAML front matter (library_name, pipeline_tag, tags with knowledge-distillation and kdcache,
base_model when the student started from a hub model, datasets and license when known), then what
a reader of the Hub page needs to trust the model: the teacher (id/path, revision), the cache it was
distilled from (path, format version, K, codec, fingerprint of the data), the method and every
setting that shapes the loss, steps and tokens seen, and the evaluation figures known so far.

The card is rendered from final/kdcache_train.json (written by `kdcache train`) plus eval results,
so it is regenerated, never patched: after `kdcache eval` of the model, and from eval.json files
beside the run that are newer than the model. A README.md without the marker line is someone
else's and is never overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import to_dict

log = logging.getLogger(__name__)

CARD_FILENAME = "README.md"
RECORD_FILENAME = "kdcache_train.json"
MARKER = ("<!-- kdcache model card: rewritten by `kdcache train` and `kdcache eval`; "
          "delete this line to keep your own edits -->")
# (eval.json key, row title, format)
FIGURES = (("ce", "cross-entropy (nats per target token)", "{:.4f}"), ("ppl", "perplexity", "{:.2f}"),
           ("teacher_top1_agreement", "top-1 agreement with the teacher", "{:.3f}"),
           ("fkl_to_teacher", "forward KL to the teacher (K + 1 buckets)", "{:.4f}"),
           ("exact_match", "exact match (greedy)", "{:.3f}"), ("rouge_l", "ROUGE-L (greedy)", "{:.3f}"),
           ("targets", "target tokens scored", "{:,}"))


def card_record(cfg: Any, ignored: tuple[str, ...], steps: int, tokens_seen: int, cache: Any | None,
                data_meta: dict[str, Any], held_out: dict[str, Any] | None) -> dict[str, Any]:
    """What the card says that only the training run knows (merged into final/kdcache_train.json).

    Deterministic for the same run (no times), since a student started from this model fingerprints
    that file (`pipeline.training.state.train_inputs`).
    """
    config = {k: v for k, v in to_dict(cfg).items() if k not in (*ignored, "out")}
    info = None
    if cache is not None:
        config["tail"] = cfg.resolved_tail(cache.tail_samples, cache.params.draw_logprobs)  # what `auto` trained with
        m = cache.meta
        info = {"path": str(cfg.cache), "format_version": m.get("format_version"), "top_k": cache.k,
                "codec": (m.get("codec") or {}).get("name"), "vocab_size": cache.vocab_size,
                "temperatures": list(cache.temperatures), "data_fingerprint": (m.get("data") or {}).get("fingerprint")}
    return {"tokens_seen": tokens_seen, "config": config,
            "teacher": cache.meta.get("teacher") if cache is not None else None, "cache_info": info,
            "data_info": {k: data_meta.get(k) for k in ("data", "format", "examples", "targets", "fingerprint",
                                                        "source_sha256")},
            "held_out": held_out}


# ---- reading other cards ---------------------------------------------------------------------
def front_matter(card: Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when absent or unreadable)."""
    try:
        text = card.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    parts = text.split("---", 2)
    if not text.startswith("---") or len(parts) < 3:
        return {}
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _base_model(student: str) -> tuple[str | None, dict[str, Any]]:
    """(hub base_model, the base's card front matter): a hub id is its own base; a local directory
    passes on the base its card names (a student started from another kdcache student)."""
    if not student:
        return None, {}
    if not _is_local(student):
        return student, {}
    meta = front_matter(Path(student).expanduser() / CARD_FILENAME)
    base = meta.get("base_model")
    return (base if isinstance(base, str) else None), meta


# ---- rendering --------------------------------------------------------------------------------
def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    for k, v in rows:
        out.append(f"| {k} | {'—' if v is None or v == '' else v} |")
    return out + [""]


def _settings_rows(c: dict[str, Any]) -> list[tuple[str, Any]]:
    gate = c.get("gate", "none")
    if gate == "none":
        gate_text = "none (every position distilled)"
    else:
        rule = {"topk": f"proposal in the teacher's top {c.get('gate_k')}",
                "threshold": f"teacher probability of the proposal >= {c.get('gate_threshold')}",
                "spec": "speculative acceptance test"}.get(gate, gate)
        gate_text = f"{gate}: {rule}; proposal {c.get('proposal')}; rejected positions weighted {c.get('reject_weight')}"
    latf = (f"on: warm-up {c.get('latf_warmup')}, EMA decay {c.get('latf_ema_decay')}, epsilon {c.get('latf_epsilon')}, "
            f"sigma {c.get('latf_sigma')}, min ratio {c.get('latf_min_ratio')}") if c.get("latf") else "off"
    idts = f"on: c = {c.get('idts_c')} (T in T_base * exp(±c))" if c.get("idts") else "off"
    return [("loss (divergence)", c.get("loss")), ("tail policy", c.get("tail")), ("SpecKD gate", gate_text),
            ("AdaKD LATF", latf), ("AdaKD IDTS", idts), ("temperature T_base", c.get("temperature")),
            ("ce_weight (alpha: alpha·CE + (1 - alpha)·KD)", c.get("ce_weight"))]


def render_card(record: dict[str, Any], evals: list[tuple[str, dict[str, Any]]], name: str) -> str:
    """The README.md text for a model trained as `record` (final/kdcache_train.json), with `evals`
    [(column title, eval figures)]."""
    from pipeline.losses.options import method_name

    c = record.get("config") or {}
    distilled = bool(c.get("cache")) and c.get("loss") != "none"
    method = method_name(c)
    base, base_meta = _base_model(c.get("student", ""))
    tags = ["knowledge-distillation", "kdcache"]
    if distilled and c.get("gate", "none") != "none":
        tags.append("speculative-knowledge-distillation")
    if distilled and (c.get("latf") or c.get("idts")):
        tags.append("adakd")
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if base:
        meta["base_model"] = base
    data = record.get("data_info") or {}
    if data.get("data") and data.get("source_sha256") is None and not _is_local(str(data["data"])):
        meta["datasets"] = [str(data["data"])]  # a datasets hub name (local files have a sha256)
    if isinstance(base_meta.get("license"), str):
        meta["license"] = base_meta["license"]

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", MARKER, "", f"# {name}", ""]
    if distilled:
        lines += [f"A student distilled with kdcache from a teacher's cached outputs ({method}): the teacher ran "
                  "once over the training data, and this model learned from its stored top-K distributions.", ""]
    else:
        lines += ["Trained with kdcache on the labels alone (cross-entropy, no teacher).", ""]

    if distilled:
        t = record.get("teacher") or {}
        lines += ["## Teacher", ""] + _table([("model", f"`{t.get('model')}`"), ("revision", t.get("revision")),
                                              ("weights sha256", t.get("weights_sha256")),
                                              ("architecture", ", ".join(t.get("architectures") or []) or None)])
        ci = record.get("cache_info") or {}
        lines += ["## Teacher cache", ""] + _table([
            ("path", f"`{ci.get('path')}`"), ("format version", ci.get("format_version")),
            ("top-K", ci.get("top_k")), ("codec", ci.get("codec")), ("vocabulary", ci.get("vocab_size")),
            ("temperature grid", ", ".join(f"{x:g}" for x in ci.get("temperatures") or [])),
            ("fingerprint of the cached data", ci.get("data_fingerprint"))])
        lines += ["## Method and settings", "", f"**{method}**", ""] + _table(_settings_rows(c))

    start = (f"`{c.get('student')}`" if c.get("student") else
             f"random initialisation from `{c.get('student_config')}`" if c.get("student_config") else None)
    lines += ["## Training", ""] + _table([
        ("optimizer steps", f"{record.get('steps', 0):,}"), ("tokens seen", f"{record.get('tokens_seen', 0):,}"),
        ("started from", start),
        ("data", f"`{data.get('data')}` ({data.get('format')}, {data.get('examples')} examples, "
                 f"{data.get('targets')} target tokens)" if data.get("data") else None),
        ("fingerprint of the prepared data", data.get("fingerprint")),
        ("optimiser", f"AdamW, lr {c.get('lr')} ({c.get('schedule')}, warm-up {c.get('warmup')}), weight decay "
                      f"{c.get('weight_decay')}, batch {c.get('batch_size')} x {c.get('grad_accum')} sequences"),
        ("seed", c.get("seed"))])

    lines += ["## Evaluation", ""]
    if evals:
        lines += ["| | " + " | ".join(title for title, _ in evals) + " |",
                  "|---|" + "---:|" * len(evals)]
        for key, title, fmt in FIGURES:
            vals = [e.get(key) for _, e in evals]
            if any(isinstance(v, (int, float)) for v in vals):
                cells = [fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"
                         for v in vals]
                lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines += ["", "Over every target token of each split; the teacher figures need that split's cache "
                      "(agreement: the student's argmax is the teacher's top-1 id).", ""]
    else:
        lines += ["Not evaluated yet: `kdcache eval --model RUN_DIR --data HELD_OUT --cache HELD_OUT_CACHE "
                  "--out RUN_DIR/eval` adds the figures here.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
              'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")', "```", ""]
    return "\n".join(lines)


# ---- writing ----------------------------------------------------------------------------------
def _evals_for(model_dir: Path, record: dict[str, Any], extra: dict[str, Any] | None) -> list[tuple[str, dict]]:
    """The eval columns: held-out figures logged during training, eval.json files beside the run that are
    newer than the model, and `extra` (an eval just made)."""
    out: list[tuple[str, dict[str, Any]]] = []
    ho = record.get("held_out")
    if ho:
        cache = f", cache `{_short(ho['cache'])}`" if ho.get("cache") else ""
        out.append((f"during training, step {ho.get('step')}: `{_short(ho.get('data'))}`{cache}", ho))
    born = (model_dir / RECORD_FILENAME).stat().st_mtime_ns
    seen = set()
    if extra is not None:
        seen.add(str(Path(extra.get("eval_json", "")).resolve()))
    if model_dir.name == "final":
        for p in (model_dir.parent / "eval" / "eval.json", model_dir.parent / "eval.json"):
            if p.is_file() and p.stat().st_mtime_ns > born and str(p.resolve()) not in seen:
                try:
                    ev = json.loads(p.read_text())
                except json.JSONDecodeError:
                    continue
                if isinstance(ev, dict):
                    out.append((_eval_title(ev), ev))
    if extra is not None:
        out.append((_eval_title(extra), extra))
    return out


def _short(path: Any) -> str:
    """The last two parts of a path: enough to tell splits apart in a column title."""
    parts = Path(str(path)).parts
    return "/".join(parts[-2:]) if parts else str(path)


def _eval_title(ev: dict[str, Any]) -> str:
    cache = f", cache `{_short(ev['cache'])}`" if ev.get("cache") else ""
    return f"`kdcache eval`: `{_short(ev.get('data'))}`{cache}"


def write_card(model_dir: Path, name: str, extra: dict[str, Any] | None = None) -> Path:
    """Render model_dir/README.md from its kdcache_train.json (tmp file + rename)."""
    record = json.loads((model_dir / RECORD_FILENAME).read_text())
    text = render_card(record, _evals_for(model_dir, record, extra), name)
    path = model_dir / CARD_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def refresh_card(model_path: str | Path, result: dict[str, Any]) -> bool:
    """After `kdcache eval`: rewrite the card of a kdcache-trained model directory with `result`.

    Returns False (and touches nothing) for any other model: a hub id, a directory without
    kdcache_train.json, or one whose README.md is not a kdcache card.
    """
    d = Path(model_path).expanduser()
    if not (d / RECORD_FILENAME).is_file():
        return False
    card = d / CARD_FILENAME
    if card.is_file() and MARKER not in card.read_text(errors="replace"):
        log.info("%s is not a kdcache model card (or was edited): left as it is", card)
        return False
    try:
        json.loads((d / RECORD_FILENAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    write_card(d, d.parent.name if d.name == "final" else d.name, result)
    return True
