"""Build the real-text prompt -> completion corpus from this Python's standard library sources.

    python data/make_stdlib.py                          # -> runs/stdlib/data/{train,heldout,text}.jsonl + manifest
    python data/make_stdlib.py --out DIR --max-prompt-lines 12 --heldout-every 20 --vocab-size 8192

The corpus, its rules and its licence (PSF-2.0) are described in `pipeline/data/stdlib_corpus.py`; `kdcache run`
builds the same thing from a `corpus:` section (configs/bench-quality.yaml). This script is the stand-alone
way to get the files, e.g. to prepare them with another tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import KdError  # noqa: E402
from pipeline.data.stdlib_corpus import CorpusConfig, build_corpus, summary_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/stdlib/data")
    ap.add_argument("--stdlib", default="", help="stdlib root (default: this Python's)")
    ap.add_argument("--max-prompt-lines", type=int, default=12)
    ap.add_argument("--max-line-chars", type=int, default=200)
    ap.add_argument("--heldout-every", type=int, default=20, help="about 1 file in N goes to held-out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=0, help="also train a BPE tokenizer of this size (0: none)")
    a = ap.parse_args()
    cfg = CorpusConfig(out=a.out, stdlib=a.stdlib, max_prompt_lines=a.max_prompt_lines,
                       max_line_chars=a.max_line_chars, heldout_every=a.heldout_every, seed=a.seed,
                       vocab_size=a.vocab_size)
    try:
        print(summary_line(build_corpus(cfg), a.out))
    except KdError as e:
        raise SystemExit(f"make_stdlib: {e}") from None


if __name__ == "__main__":
    main()
