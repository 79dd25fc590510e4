"""Gemma 3's vocabulary size, V = 262,144, through the teacher, the cache codec and eval, on this CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/large_vocab.py                  # ~3 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/student_memory.py --vocab 262144   # the student step's memory

No model of that vocabulary can be downloaded here, so the teacher is a tiny random Gemma-3 text model (hidden 64,
2 layers, tied head scaled x8 so rows range from confident to flat) and the tokenizer a word-level one with
262,144 entries (`w0` ... ); the text is Zipf-distributed words over the whole vocabulary (ids up to 262,143 occur,
so the cache's ids need 18 bits). Reported: bytes/row in all and per array for the default preset, the teacher
stage's wall time against a bare forward with full logits over the same examples, and every cached quantity
against the float64 full softmax (bench/real_llm_measure.py's comparison), the entropy error above all (the
tail entropy's grid is log(V - K) = 12.5 nats wide). Random-model top-K ids are close to incompressible, so the
id bytes are an upper bound for a trained model's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

V = 262_144


def word_tokenizer(vocab: int, out: Path) -> Path:
    """A word-level fast tokenizer of exactly `vocab` ids: <pad> = 0, <eos> = 1, then w2 ... w{vocab-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(out)
    return out


def zipf_texts(n: int, words: int, vocab: int, seed: int = 0) -> list[str]:
    """n texts of `words` words, ids Zipf(1.1)-distributed over [2, vocab) with a random rank-to-id map, so
    frequent words are spread over the id range (large ids occur)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(2, vocab))
    ranks = np.minimum(rng.zipf(1.1, size=(n, words)), len(perm)) - 1
    return [" ".join(f"w{perm[r]}" for r in row) for row in ranks]


def tiny_gemma3(vocab: int, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                           sliding_window=64, query_pre_attn_scalar=32)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # tied: rows range from confident to near-flat
    model.save_pretrained(out)
    return out


def build(root: Path, vocab: int, texts: int, words: int) -> tuple[Path, Path, Path]:
    """(tokenizer, model, prepared) under root, made by the library calls `kdcache prepare` uses."""
    from pipeline.data.prepare import PrepareConfig, prepare

    tok, model, prep = root / "tokenizer", root / "model", root / "prepared"
    if not (tok / "tokenizer.json").is_file():
        word_tokenizer(vocab, tok)
    if not (model / "config.json").is_file():
        tiny_gemma3(vocab, model)
    src = root / "text.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in zipf_texts(texts, words, vocab)))
    prepare(PrepareConfig(data=str(src), tokenizer=str(tok), out=str(prep), max_length=words + 1, format="text",
                          overwrite=True))
    return tok, model, prep


def main() -> None:
    import real_llm_measure as rm
    from transformers import AutoModelForCausalLM

    from pipeline.cache import open_cache
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/large_vocab")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--words", type=int, default=256)
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    _, model_dir, prep = build(root, V, a.texts, a.words)
    ids, masks = rm.load_examples(prep)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bare = rm.bare_forward_seconds(model, ids)
    cdir = root / "cache"
    shutil.rmtree(cdir, ignore_errors=True)
    t0 = time.perf_counter()
    run_teacher(TeacherConfig(data=str(prep), model=str(model_dir), out=str(cdir), device="cpu", dtype="float32",
                              threads=torch.get_num_threads(), preset="compact"))  # K = 8, no draws: as documented
    secs = time.perf_counter() - t0
    cache = open_cache(cdir)
    errs = rm.Errors(cache)
    for ref in rm.reference_rows(model, ids, masks, V, np.asarray([1.0 / t for t in cache.temperatures])):
        errs.add(ref)
    e = errs.summary()
    n = cache.num_rows
    arrays = {k: v / n for k, v in cache.array_bytes().items()}
    top = cache.read(0, n, ("topk_ids",))["topk_ids"]
    rec = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "vocab": V, "rows": n,
           "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/large_vocab.py " + " ".join(sys.argv[1:]),
           "bytes_per_row": cache.bytes_on_disk() / n, "arrays": arrays,
           "max_cached_id": int(top.max()), "entropy_bits": cache.params.entropy_bits, "teacher_s": secs,
           "bare_forward_s": bare, "teacher_over_bare": secs / bare, "errors": e}
    (root / "large_vocab.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"V = {V:,}, {n:,} rows ({rec['date']}, `{rec['command']}`): {rec['bytes_per_row']:.2f} bytes/row "
          f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(arrays.items()))}); largest cached id {rec['max_cached_id']:,}; "
          f"teacher stage {secs:.1f} s = {secs / bare:.2f} x a bare forward ({bare:.1f} s); entropy bits "
          f"{rec['entropy_bits']}; max |error| vs float64: head log p {e['topk_logprobs']['max']:.4f}, log r "
          f"{e['tail_logprob_rel']['max']:.5f}, entropy {e['entropy']['max']:.4f} (median "
          f"{e['entropy']['median']:.5f}), log A(b) {e['log_partition']['max']:.4f}, target log p "
          f"{e['target_logprobs']['max']:.4f}")


if __name__ == "__main__":
    main()
