"""Stage 0: tokenize a corpus into `input_ids` + `loss_mask`, the rows every later stage indexes.

    kdcache prepare --data data/demo/train.jsonl --tokenizer data/demo/tokenizer --out runs/demo/prepared

Position t (t >= 1) of an example is a *target* when `loss_mask[t] == 1`: it is predicted from
`input_ids[:t]`. The teacher caches one row per target, in dataset order then position order, so
the row range of every example is known from `loss_mask` alone before any model runs.

Output: a `datasets.load_from_disk` directory plus `kdcache_prepare.json` recording the tokenizer
identity, a fingerprint of the produced columns, counts and the resolved config. Its files are written
in a staging directory and renamed into place, `kdcache_prepare.json` last, so a killed run leaves
nothing to mistake for a finished one (and its re-run redoes it: `pipeline.ownership`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from pipeline.config import changes, save_config, to_dict
from pipeline.data.chat import encode_chat
from pipeline.data.corpus import RecordPlaces, input_files, load_records, looks_like_path
from pipeline.errors import KdError, StaleOutput
from pipeline.identity import file_sha256, read_json, tokenizer_identity, write_json
from pipeline.models import load_tokenizer
from pipeline.ownership import PREPARE, STATE_DIR, Output, claim
from pipeline.storage import is_url, store_for

log = logging.getLogger(__name__)

META_FILENAME = "kdcache_prepare.json"
FORMATS = ("auto", "text", "prompt-response", "chat")


@dataclass
class PrepareConfig:
    """Settings of `kdcache prepare`."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("out",)  # may be an fsspec URL (pipeline.storage, pipeline.data.remote)

    data: str = ""  # file, directory of files, `load_from_disk` directory, or a datasets hub name
    tokenizer: str = ""  # local directory or hub id
    out: str = ""
    max_length: int = 2048  # longer examples are truncated (counted in the summary)
    format: str = "auto"  # auto | text | prompt-response | chat
    split: str = "train"
    text_field: str = "text"
    add_eos: bool = True  # append EOS to text and prompt-response examples (it is a target)
    max_examples: int = 0  # > 0: a seeded random subset of this many examples, kept in corpus order
    sample_seed: int = 0  # the subset's seed
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise KdError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.max_length < 2:
            raise KdError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_examples < 0:
            raise KdError(f"max_examples must be >= 0 (0: every example), got {self.max_examples}")

    def identity(self) -> dict[str, Any]:
        """The settings that change the output (not where it goes or whether to overwrite)."""
        d = to_dict(self)
        d.pop("out")
        d.pop("overwrite")
        return d


def source_sha256(data: str) -> str | None:
    """sha256 over the bytes of a local input (a file, or every file under a directory); None for a
    hub name. Recorded so that a re-run notices an input file edited in place."""
    p = Path(data).expanduser()
    if p.is_file():
        files, root = [p], p.parent
    elif p.is_dir():
        # kdcache's own records in an input that is itself a kdcache output (its lock, its manifest) are not data
        files, root = sorted(f for f in p.rglob("*") if f.is_file() and STATE_DIR not in f.relative_to(p).parts), p
    elif looks_like_path(data):
        raise KdError(f"data not found: {data}")
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(f"{f.relative_to(root)}\t{file_sha256(f)}\n".encode())
        except OSError as e:
            raise KdError(f"cannot read data {str(f)!r}: {e.strerror or e}") from None
    return h.hexdigest()


def detect_format(columns: list[str], text_field: str) -> str:
    """Pick the format from the dataset's fields: messages -> chat, prompt+response, else text."""
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "response" in columns:
        return "prompt-response"
    if text_field in columns:
        return "text"
    raise KdError(f"cannot tell the data format from fields {columns}: expected 'messages', "
                  f"'prompt'+'response' or '{text_field}' (or pass --format)")


# A record longer than --max-length is tokenized a prefix at a time (below): first this many characters per kept
# token, then 4x more while the prefix is too short. The prefix must give CUT_MARGIN tokens beyond what is kept,
# so the cut (which can change how the last few tokens before it merge) never reaches a kept token.
CHARS_PER_TOKEN = 8
CUT_MARGIN = 64


def _encode(tokenizer: Any, text: str, limit: int | None = None) -> list[int]:
    """Token ids of `text`. With `limit`, only the first `limit + 1` are returned when the text has more (enough
    to keep `limit` and to know it was cut), found by tokenizing growing prefixes: memory and time are bounded by
    the kept length, not by the record (a 54 MB record took 10 GB and minutes to keep 2,048 tokens)."""
    if limit is not None:
        n = (limit + CUT_MARGIN) * CHARS_PER_TOKEN
        while n < len(text):
            ids = tokenizer(text[:n], add_special_tokens=False)["input_ids"]
            if len(ids) > limit + CUT_MARGIN:
                return ids[: limit + 1]
            n *= 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if limit is None else ids[: limit + 1]


def encode_text(tokenizer: Any, text: str, add_eos: bool, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Every token after the first is a target; a BOS is prepended when the tokenizer has one. `limit`: the
    caller keeps at most this many tokens (`_encode`)."""
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _encode(tokenizer, text, limit)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, [0] + [1] * (len(ids) - 1)


def encode_prompt_response(tokenizer: Any, prompt: str, response: str, add_eos: bool,
                           limit: int | None = None) -> tuple[list[int], list[int]]:
    """Only response tokens and the final EOS are targets. `limit`: the caller keeps at most this many tokens."""
    head = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _encode(tokenizer, prompt, limit)
    tail = _encode(tokenizer, response, limit)
    if add_eos and tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return head + tail, [0] * len(head) + [1] * len(tail)


FIELDS = {"text": None, "prompt-response": ("prompt", "response"), "chat": ("messages",)}


def tokenize_records(ds: Any, tokenizer: Any, fmt: str, cfg: PrepareConfig,
                     where: Any = None) -> Iterator[tuple[list[int], list[int], bool] | None]:
    """Yield (input_ids, loss_mask, truncated) per record, or None for an empty text (skipped: as BOS + EOS it
    would teach the student that a document ends before it starts).

    `where(i)` names record i in errors (`FILE:LINE (example i)`); a missing or null field is an
    error rather than an empty string, so a broken record is never trained on as an empty one.
    """
    where = where or (lambda i: f"example {i}")
    fields = FIELDS[fmt] or (cfg.text_field,)
    for i, rec in enumerate(ds):
        try:
            absent = [f for f in fields if rec.get(f) is None]
            if absent:
                raise KdError(f"field {absent[0]!r} is missing or null")
            if fmt == "text":
                text = str(rec[cfg.text_field])
                if not text.strip():
                    yield None
                    continue
                ids, mask = encode_text(tokenizer, text, cfg.add_eos, cfg.max_length)
            elif fmt == "prompt-response":
                ids, mask = encode_prompt_response(tokenizer, str(rec["prompt"]), str(rec["response"]), cfg.add_eos,
                                                   cfg.max_length)
            else:
                ids, mask = encode_chat(tokenizer, rec["messages"])
        except KdError as e:
            raise KdError(f"{where(i)}: {e}") from None
        except Exception as e:  # a template error, a malformed record: name the example, not a traceback
            msg = str(e).splitlines()[0] if str(e) else ""
            raise KdError(f"{where(i)}: cannot encode as {fmt} ({type(e).__name__}: {msg})") from None
        truncated = len(ids) > cfg.max_length
        mask = mask[: cfg.max_length]
        if mask:
            mask[0] = 0  # position 0 has no context: never a target (the teacher caches t >= 1 only)
        yield ids[: cfg.max_length], mask, truncated


def local_path(path: str | Path) -> Path:
    """A prepared directory: `path` itself, or for a URL its checked local copy (`pipeline.data.remote`)."""
    if is_url(path):
        from pipeline.data.remote import local_prepared

        return local_prepared(str(path), META_FILENAME)
    return Path(path)


def prepared_meta(path: str | Path) -> dict[str, Any]:
    """The `kdcache_prepare.json` of a prepared directory or URL (a `KdError` if it is not one)."""
    p = local_path(path)
    if not p.is_dir():
        raise KdError(f"prepared data not found: {p} (run `kdcache prepare` first)")
    return read_json(p / META_FILENAME, "prepared-data record (kdcache_prepare.json)")


def load_prepared(path: str | Path) -> Any:
    """The prepared `datasets.Dataset` at `path`, checked to be one that `prepare` finished."""
    import datasets

    datasets.disable_progress_bars()
    meta = prepared_meta(path)
    if meta.get("examples") == 0:
        raise KdError(f"prepared data {path} is empty (0 examples): nothing to do")
    try:
        return datasets.load_from_disk(str(local_path(path)))
    except Exception as e:  # an empty or damaged Arrow directory fails deep inside datasets
        msg = str(e).splitlines()[0] if str(e) else ""
        raise KdError(f"cannot load prepared data {path}: {type(e).__name__}: {msg}") from None


def prepare(cfg: PrepareConfig, progress: bool = False) -> dict[str, Any]:
    """Tokenize `cfg.data` into `cfg.out`; returns the record written to `kdcache_prepare.json`.

    Re-running with the same settings on a finished output does nothing; different settings on an
    existing output are refused unless `cfg.overwrite`.
    """
    if not cfg.out:
        raise KdError("no output directory given (--out DIR)")
    if not cfg.data:
        raise KdError("no input data given (--data FILE_OR_DIR_OR_NAME)")
    source = source_sha256(cfg.data)
    if is_url(cfg.out):
        return _prepare_to_url(cfg, progress, source)
    out = Path(cfg.out)
    # The lock, then every file in OUT checked against prepare's records: anything else refuses, first.
    with claim(out, PREPARE) as own:
        return _prepare(cfg, progress, source, own, out)


def _prepare_to_url(cfg: PrepareConfig, progress: bool, source: str | None) -> dict[str, Any]:
    """`prepare --out URL`: prepared in a local staging directory, then uploaded, the record last."""
    from pipeline.storage.staging import staging_dir
    from pipeline.data import remote

    store = store_for(cfg.out)
    alien = remote.foreign(store)
    if alien:
        raise KdError(f"{store.uri(alien[0])} is not a file `kdcache prepare` writes: --out must be a new prefix or "
                      "one prepare wrote (nothing is deleted that kdcache did not write); choose another --out")
    old = remote.read_record(store, META_FILENAME)
    if old is not None and not cfg.overwrite:
        diff = _differences(old, cfg, source)
        if diff:
            raise StaleOutput(f"{cfg.out} holds data prepared with other settings ({', '.join(diff)}); "
                              "pass --overwrite to replace it", diff)
        old["skipped"] = True
        return old
    staging = staging_dir("prepare")
    try:
        with claim(staging, PREPARE) as own:
            meta = _prepare(cfg, progress, source, own, staging)
        remote.upload_dataset_dir(staging, store, META_FILENAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _differences(meta: dict[str, Any], cfg: PrepareConfig, source: str | None) -> list[str]:
    diff = changes(meta.get("config_identity") or {}, cfg.identity())
    if meta.get("source_sha256") != source:
        diff.append(f"input changed: {cfg.data}")
    return diff


def _prepare(cfg: PrepareConfig, progress: bool, source: str | None, own: Output, out: Path) -> dict[str, Any]:
    """Prepare into the directory `out` (cfg.out, or a staging directory for a URL)."""
    meta_path = out / META_FILENAME
    if meta_path.exists():
        meta = read_json(meta_path, "prepared-data record")
        diff = _differences(meta, cfg, source)
        if not cfg.overwrite:
            if diff:
                raise StaleOutput(f"{out} holds data prepared with other settings ({', '.join(diff)}); "
                                  "pass --overwrite to replace it", diff)
            meta["skipped"] = True
            return meta
    # Without kdcache_prepare.json, whatever OUT holds is prepare's own (`claim` checked): a killed run's files.

    tokenizer = load_tokenizer(cfg.tokenizer)
    ds = load_records(cfg.data, cfg.split)
    if len(ds) == 0:
        raise KdError(f"the dataset {cfg.data} is empty")
    fmt = cfg.format if cfg.format != "auto" else detect_format(list(ds.column_names), cfg.text_field)
    need = {"text": [cfg.text_field], "prompt-response": ["prompt", "response"], "chat": ["messages"]}[fmt]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise KdError(f"format {fmt!r} needs field(s) {missing}; the data has {list(ds.column_names)}")

    places = RecordPlaces(input_files(cfg.data))
    if 0 < cfg.max_examples < len(ds):  # a subset in corpus order; errors still name the record's own line
        keep = np.sort(np.random.default_rng(cfg.sample_seed).choice(len(ds), cfg.max_examples, replace=False))
        ds = ds.select(keep.tolist())
        where = lambda i: places(int(keep[i]))  # noqa: E731
    else:
        where = places
    all_ids, all_masks = [], []
    fp = hashlib.sha256()
    n_tokens = n_targets = n_truncated = n_empty = 0
    records = tokenize_records(ds, tokenizer, fmt, cfg, where)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, total=len(ds), desc="prepare", unit="ex", leave=False)
    for rec in records:
        if rec is None:
            n_empty += 1
            continue
        ids, mask, truncated = rec
        all_ids.append(ids)
        all_masks.append(mask)
        a, m = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)
        fp.update(np.int64(len(a)).tobytes() + a.tobytes() + m.tobytes())
        n_tokens += len(ids)
        n_targets += int(m.sum())
        n_truncated += truncated
    if n_targets == 0:
        empty = f" ({n_empty} empty texts skipped)" if n_empty else ""
        raise KdError(f"no target positions in {cfg.data} (format {fmt}{empty}): nothing to distill")

    meta = {
        "kind": "kdcache-prepared",
        "format": fmt,
        "data": str(cfg.data),
        "source_sha256": source,
        "tokenizer": tokenizer_identity(tokenizer, cfg.tokenizer),
        "fingerprint": fp.hexdigest(),
        "examples": len(all_ids),
        "tokens": n_tokens,
        "targets": n_targets,
        "truncated": n_truncated,
        "empty_skipped": n_empty,
        "max_length": cfg.max_length,
        "config_identity": cfg.identity(),
    }
    write_prepared(out, all_ids, all_masks, meta, cfg, own=own)
    return meta


def write_prepared(out: str | Path, input_ids: list[list[int]], loss_masks: list[list[int]],
                   meta: dict[str, Any], cfg: Any = None, own: Output | None = None) -> None:
    """Save columns + `kdcache_prepare.json` (+ the config) in a staging directory inside OUT/.kdcache, then
    replace what an earlier prepare wrote and rename them into place, `kdcache_prepare.json` last (so its
    presence means the data is complete). `own`: the caller's claim on OUT (else one is taken here).

    Also used by `bench/teacher.py` to write synthetic token data without a tokenizer.
    """
    import datasets

    out = Path(out)
    if not input_ids:
        raise KdError(f"refusing to write an empty prepared dataset to {out}")
    if own is None:
        with claim(out, PREPARE) as own:
            return write_prepared(out, input_ids, loss_masks, meta, cfg, own=own)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "loss_mask": datasets.Sequence(datasets.Value("int8"))})
    out_ds = datasets.Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_masks}, features=features)
    tmp = own.staging()
    try:
        out_ds.save_to_disk(str(tmp))
        write_json(tmp / META_FILENAME, meta)
        if cfg is not None:
            save_config(cfg, tmp / "config.yaml")
        own.remove_owned()  # only what an earlier prepare wrote (`claim` refused anything else)
        own.move_in(tmp, last=(META_FILENAME,))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def summary_line(meta: dict[str, Any], out: str) -> str:
    """One-line human summary of a prepare run."""
    if meta.get("skipped"):
        return f"prepare: {out} already up to date ({meta['examples']} examples, {meta['targets']} targets); nothing to do"
    trunc = f", {meta['truncated']} truncated to {meta['max_length']}" if meta["truncated"] else ""
    empty = f", {meta['empty_skipped']} empty texts skipped" if meta.get("empty_skipped") else ""
    return (f"prepare: {meta['examples']} examples, {meta['tokens']} tokens, {meta['targets']} targets "
            f"({meta['format']}{trunc}{empty}) -> {out}")


