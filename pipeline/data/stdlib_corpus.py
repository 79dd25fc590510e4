"""A real-text prompt -> completion corpus cut from the Python standard library's own sources, and the
tokenizer trained on it: what `kdcache run` builds from a `corpus:` section (configs/bench-quality.yaml).

    from pipeline.data.stdlib_corpus import CorpusConfig, build_corpus
    build_corpus(CorpusConfig(out="runs/corpus", vocab_size=8192))   # train/heldout/text.jsonl, tokenizer/

Why this text: the benchmarks need text that nobody on this project wrote, that is present on every machine
with no download, and whose next-token distributions look like a real language model's (mixed confidence:
boilerplate is near-certain, names and literals are not). The standard library's non-test `.py` sources
(~11 MB in CPython 3.11) fit; they are under the Python Software Foundation License (PSF-2.0), recorded in
the manifest.

Each file is cut into consecutive, non-overlapping tiles; a tile is a prompt (4..max lines of the file)
followed by a completion (1..3 lines). A tile boundary is placed only between two non-blank lines, and the
prompt ends without its newline while the completion starts with it, so encoding the two halves separately
gives the same tokens as encoding the tile as one text (byte-level BPE splits "\\n    def" into
"\\n   " + " def" either way). Lines are right-stripped; a tile with a line over `max_line_chars`
characters (data tables) is dropped. The tiles of a file, read in order, are the file.

Outputs: train.jsonl / heldout.jsonl as `{"prompt", "response"}` records (`kdcache prepare` reads them:
targets are the completion tokens), text.jsonl the train tiles as `{"text": prompt + response}` (every token
a target: what a teacher is pre-trained on), manifest.json, and with `vocab_size` a byte-level BPE
tokenizer/ trained on the train text only (held-out files never reach it).

Split: a file goes to held-out when int(sha256(relative path)[:8], 16) % heldout_every == 0, so the split
does not depend on the file set or order. Output is deterministic for a given Python installation: same
sources and settings -> byte-identical files (the manifest says which sources, and `build_corpus` skips the
work when the manifest's settings and output hashes still match).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import to_dict
from pipeline.errors import KdError

log = logging.getLogger(__name__)

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
LICENCE = ("Python Software Foundation License Version 2 (PSF-2.0), the licence of the Python standard "
           "library; its text is LICENSE.txt in the stdlib directory (sha256 recorded as licence_sha256)")


def stdlib_files(root: Path) -> list[Path]:
    """Non-test `.py` files under the stdlib root, sorted by relative path.

    Skipped: test packages (`test`, `tests`, `idle_test`), `test_*.py`, `site-packages`, and
    `_sysconfigdata_*` / `config-*` (generated per machine, so they would make the corpus differ
    between two installs of the same Python version).
    """
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(("test_", "_sysconfigdata")):
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _cuttable(lines: list[str], i: int) -> bool:
    """A boundary before line i is allowed when lines i-1 and i are both non-blank."""
    return 0 < i < len(lines) and bool(lines[i - 1].strip()) and bool(lines[i].strip())


def tiles(text: str, rng: random.Random, max_prompt: int, max_line_chars: int) -> list[tuple[str, str]]:
    """Cut one file into (prompt, completion) tiles; see the module docstring for the rules."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    out, start = [], 0
    while start < len(lines):
        n_prompt, n_comp = rng.randint(4, max_prompt), rng.randint(1, 3)
        cut = start + n_prompt
        while cut < len(lines) and not _cuttable(lines, cut):  # move the prompt/completion boundary forward
            cut += 1
        end = cut + n_comp
        while end < len(lines) and not _cuttable(lines, end):  # and the end of the tile
            end += 1
        if cut >= len(lines):
            break
        end = min(end, len(lines))
        prompt, comp = lines[start:cut], lines[cut:end]
        if max(len(ln) for ln in prompt + comp) <= max_line_chars and any(ln.strip() for ln in prompt):
            out.append(("\n".join(prompt), "\n" + "\n".join(comp)))
        start = end
    return out


def is_heldout(rel: str, every: int) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % every == 0


@dataclass
class CorpusConfig:
    """Settings of the stdlib corpus (`corpus:` in a run config)."""

    out: str = ""
    source: str = "python-stdlib"  # the only source: this Python's standard library sources
    stdlib: str = ""  # the stdlib root; empty = this Python's (sysconfig)
    max_prompt_lines: int = 12
    max_line_chars: int = 200
    heldout_every: int = 20  # about 1 file in N goes to held-out
    seed: int = 0
    vocab_size: int = 0  # > 0: also train a byte-level BPE tokenizer of this size on the train text

    def __post_init__(self) -> None:
        if self.source != "python-stdlib":
            raise KdError(f"corpus source must be python-stdlib, got {self.source!r}")
        if self.max_prompt_lines < 4 or self.max_line_chars < 1 or self.heldout_every < 2:
            raise KdError("corpus: need max_prompt_lines >= 4, max_line_chars >= 1 and heldout_every >= 2")

    def root(self) -> Path:
        return Path(self.stdlib or sysconfig.get_paths()["stdlib"])


SPLITS = ("train", "heldout", "text")
MANIFEST = "manifest.json"


def _write_splits(out: Path, cfg: CorpusConfig) -> dict[str, Any]:
    """Write train.jsonl, heldout.jsonl and text.jsonl under `out` (each via a temporary name); return counts."""
    root = cfg.root()
    if not root.is_dir():
        raise KdError(f"corpus: the standard library directory {root} does not exist")
    files, counts, chars = [], {"train": 0, "heldout": 0}, {"train": 0, "heldout": 0}
    handles = {s: open(out / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in SPLITS}
    try:
        for p in stdlib_files(root):
            rel = p.relative_to(root).as_posix()
            raw = p.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a handful of stdlib files are latin-1 test fixtures; not text we want
                continue
            split = "heldout" if is_heldout(rel, cfg.heldout_every) else "train"
            # Per-file generator: one file's tiles do not depend on which other files exist.
            rng = random.Random(f"{cfg.seed}:{rel}")
            ex = tiles(text, rng, cfg.max_prompt_lines, cfg.max_line_chars)
            for prompt, resp in ex:
                handles[split].write(json.dumps({"prompt": prompt, "response": resp}, ensure_ascii=False) + "\n")
                if split == "train":
                    handles["text"].write(json.dumps({"text": prompt + resp}, ensure_ascii=False) + "\n")
                chars[split] += len(prompt) + len(resp)
            counts[split] += len(ex)
            files.append({"path": rel, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                          "split": split, "examples": len(ex)})
    finally:
        for h in handles.values():
            h.close()
    for s in SPLITS:
        (out / f"{s}.jsonl.tmp").replace(out / f"{s}.jsonl")
    return {"files": files, "counts": {"files": len(files), "files_heldout": sum(f["split"] == "heldout" for f in files),
                                       "examples": counts, "chars": chars}}


def _settings(cfg: CorpusConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    d.pop("out")
    d["stdlib"] = str(cfg.root())
    return d


def _up_to_date(out: Path, cfg: CorpusConfig) -> dict[str, Any] | None:
    """The manifest when `out` holds this corpus, made with these settings and unchanged since."""
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if m.get("settings") != _settings(cfg) or m.get("python_version") != platform.python_version():
        return None
    for s in SPLITS:
        f = out / f"{s}.jsonl"
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != m.get("outputs", {}).get(s):
            return None
    if cfg.vocab_size and m.get("tokenizer_sha256") != _tokenizer_sha(out / "tokenizer"):
        return None
    return m


def _tokenizer_sha(path: Path) -> str | None:
    f = path / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def build_corpus(cfg: CorpusConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or find up to date) the corpus under `cfg.out`; returns its manifest (plus `skipped`).

    The manifest is written last, so a killed build is redone by the next call rather than mistaken for a
    finished one.
    """
    if not cfg.out:
        raise KdError("corpus: no output directory")
    out = Path(cfg.out)
    m = _up_to_date(out, cfg)
    if m is not None:
        return {**m, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    if echo:
        echo(f"corpus: cutting {cfg.root()} into prompt -> completion tiles")
    parts = _write_splits(out, cfg)
    tok_sha = None
    if cfg.vocab_size:
        from pipeline.data.bpe_tokenizer import train_tokenizer

        with open(out / "text.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        tok = train_tokenizer(texts, out / "tokenizer", vocab_size=cfg.vocab_size)
        if len(tok) != cfg.vocab_size:
            raise KdError(f"corpus: the tokenizer has {len(tok)} tokens, not {cfg.vocab_size} (too few merges in "
                          "the text for that vocabulary)")
        tok_sha = _tokenizer_sha(out / "tokenizer")
    root = cfg.root()
    lic = root / "LICENSE.txt"
    manifest = {
        "kind": "kdcache-stdlib-corpus",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_root": str(root),
        "licence": LICENCE,
        "licence_sha256": hashlib.sha256(lic.read_bytes()).hexdigest() if lic.is_file() else None,
        "settings": _settings(cfg),
        "counts": parts["counts"],
        "outputs": {s: hashlib.sha256((out / f"{s}.jsonl").read_bytes()).hexdigest() for s in SPLITS},
        "tokenizer_sha256": tok_sha,
        "files": parts["files"],
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / MANIFEST)
    return {**manifest, "skipped": False}


def summary_line(m: dict[str, Any], out: str) -> str:
    c = m["counts"]
    tok = f", tokenizer V = {m['settings']['vocab_size']:,}" if m.get("tokenizer_sha256") else ""
    return (f"corpus: {c['files']} stdlib files ({c['files_heldout']} held out), examples train "
            f"{c['examples']['train']:,} / heldout {c['examples']['heldout']:,}{tok} (Python {m['python_version']})"
            f"{'; up to date, skipped' if m.get('skipped') else ''} -> {out}")
