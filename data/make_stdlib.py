"""Build a real-text prompt -> completion corpus from the Python standard library's own sources.

Why: the benchmarks need text that nobody on this project wrote, that is present on every machine with
no download, and whose next-token distributions look like a real language model's (mixed
confidence: boilerplate is near-certain, names and literals are not). The standard library's
non-test `.py` sources (~11 MB in CPython 3.11) fit; they are under the Python Software Foundation
License (PSF-2.0), recorded in the manifest.

    python data/make_stdlib.py                      # -> runs/stdlib/data/{train,heldout}.jsonl + manifest.json
    python data/make_stdlib.py --out DIR --max-prompt-lines 12 --heldout-every 20

Each file is cut into consecutive, non-overlapping tiles; a tile is a prompt (4..max lines of the
file) followed by a completion (1..3 lines). A tile boundary is placed only between two non-blank
lines, and the prompt ends without its newline while the completion starts with it, so encoding the
two halves separately gives the same tokens as encoding the tile as one text (byte-level BPE splits
"\\n    def" into "\\n   " + " def" either way). Lines are right-stripped; a tile with a line over
`--max-line-chars` characters (data tables) is dropped. The tiles of a file, read in order, are the
file, so training on `prompt + response` as plain text visits every kept line once.

Split: a file goes to held-out when int(sha256(relative path)[:8], 16) % heldout_every == 0, so the
split does not depend on the file set or order. Output is deterministic for a given Python
installation: same sources and settings -> byte-identical files (the manifest says which sources).
JSONL records are `{"prompt": ..., "response": ...}`, the format `kdcache prepare` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import sys
import sysconfig
from pathlib import Path

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


def build(out: Path, root: Path, max_prompt: int, max_line_chars: int, heldout_every: int, seed: int) -> dict:
    """Write train.jsonl, heldout.jsonl and manifest.json under `out`; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    files, counts = [], {"train": 0, "heldout": 0}
    chars = {"train": 0, "heldout": 0}
    handles = {s: open(out / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in counts}
    try:
        for p in stdlib_files(root):
            rel = p.relative_to(root).as_posix()
            raw = p.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a handful of stdlib files are latin-1 test fixtures; not text we want
                continue
            split = "heldout" if is_heldout(rel, heldout_every) else "train"
            # Per-file generator: one file's tiles do not depend on which other files exist.
            rng = random.Random(f"{seed}:{rel}")
            ex = tiles(text, rng, max_prompt, max_line_chars)
            for prompt, resp in ex:
                handles[split].write(json.dumps({"prompt": prompt, "response": resp}, ensure_ascii=False) + "\n")
                chars[split] += len(prompt) + len(resp)
            counts[split] += len(ex)
            files.append({"path": rel, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                          "split": split, "examples": len(ex)})
    finally:
        for h in handles.values():
            h.close()
    for s in counts:
        (out / f"{s}.jsonl.tmp").replace(out / f"{s}.jsonl")
    lic = root / "LICENSE.txt"
    manifest = {
        "kind": "kdcache-stdlib-corpus",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_root": str(root),
        "licence": LICENCE,
        "licence_sha256": hashlib.sha256(lic.read_bytes()).hexdigest() if lic.is_file() else None,
        "settings": {"max_prompt_lines": max_prompt, "max_line_chars": max_line_chars,
                     "heldout_every": heldout_every, "seed": seed},
        "counts": {"files": len(files), "files_heldout": sum(f["split"] == "heldout" for f in files),
                   "examples": counts, "chars": chars},
        "outputs": {s: hashlib.sha256((out / f"{s}.jsonl").read_bytes()).hexdigest() for s in counts},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/stdlib/data")
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="stdlib root (default: this Python's)")
    ap.add_argument("--max-prompt-lines", type=int, default=12)
    ap.add_argument("--max-line-chars", type=int, default=200)
    ap.add_argument("--heldout-every", type=int, default=20, help="about 1 file in N goes to held-out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m = build(Path(a.out), Path(a.stdlib), a.max_prompt_lines, a.max_line_chars, a.heldout_every, a.seed)
    c = m["counts"]
    print(f"make_stdlib: {c['files']} files ({c['files_heldout']} held out), examples train "
          f"{c['examples']['train']:,} / heldout {c['examples']['heldout']:,}, chars train "
          f"{c['chars']['train']:,} -> {a.out} (Python {m['python_version']})")


if __name__ == "__main__":
    main()
