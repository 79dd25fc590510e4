"""Reading a corpus for `kdcache prepare`: local files, a saved dataset or a hub name, and naming a
record by the file and line it came from.

    ds = load_records("corpus.jsonl", split="train")
    where = RecordPlaces(input_files("corpus.jsonl"))
    where(2)   # 'corpus.jsonl:3 (example 2)'

`datasets` reports a broken line as "An error occurred while generating the dataset"; the user needs
`corpus.jsonl:3: not valid JSON (...)`. Both helpers re-read the input only when an error is being
reported, so a good corpus pays nothing for them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import KdError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}


def looks_like_path(data: str) -> bool:
    """True when `data` is meant as a local path (not a hub name), even if nothing is there."""
    return data.startswith((".", "/", "~")) or Path(data).suffix in FILE_TYPES


def input_files(data: str) -> list[Path] | None:
    """The local files `data` names (a file, or the data files of a folder); None for a saved dataset
    or a hub name."""
    p = Path(data).expanduser()
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        return None
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in FILE_TYPES)
        if not files:
            raise KdError(f"no data files (.jsonl .json .parquet .csv .txt) in {p}")
        return files
    if p.is_file():
        return [p]
    if looks_like_path(data):
        raise KdError(f"data not found: {data}")
    return None


def load_records(data: str, split: str) -> Any:
    """Open `data` as a `datasets.Dataset`: local files, a saved dataset, or a hub dataset name.

    A malformed line of a JSON input is reported as `FILE:LINE: ...` (found by re-reading the files
    with `json` once `datasets` has failed, so a good input pays nothing for it).
    """
    import datasets

    datasets.disable_progress_bars()
    p = Path(data).expanduser()
    files = input_files(data)
    # datasets logs its own ERROR line before raising; the failure is reported below as one line.
    ds_log = logging.getLogger("datasets")
    level = ds_log.level
    ds_log.setLevel(logging.CRITICAL)
    try:
        if files is None and p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KdError(f"split {split!r} not in {p} (has {', '.join(ds)})")
                ds = ds[split]
            return ds
        if files is None:
            return datasets.load_dataset(data, split=split)
        kinds = {FILE_TYPES.get(f.suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise KdError(f"cannot read {files[0]}: use one of .jsonl .json .parquet .csv .txt")
        if all(f.stat().st_size == 0 for f in files):  # datasets fails on it with a bare StopIteration
            raise KdError(f"the dataset {data} is empty ({'an empty file' if len(files) == 1 else 'empty files'})")
        return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except KdError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input; the user needs one line
        bad = first_bad_json_line(files) if files and FILE_TYPES.get(files[0].suffix) == "json" else None
        if bad:
            raise KdError(bad) from None
        raise KdError(f"cannot read data {data!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        ds_log.setLevel(level)


def _is_json_document(f: Path) -> bool:
    """True for a .json file holding one JSON document (an array), False for JSON lines."""
    with f.open("rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def first_bad_json_line(files: list[Path]) -> str | None:
    """`FILE:LINE: why` for the first line of JSON input that is not a JSON object, else None."""
    for f in files:
        if _is_json_document(f):
            try:
                json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                line = getattr(e, "lineno", "?")
                return f"{f}:{line}: not valid JSON ({getattr(e, 'msg', e)})"
            continue
        n = 0
        with f.open(encoding="utf-8", errors="strict") as fh:
            try:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line.rstrip())  # so a column is one of this line's
                    except json.JSONDecodeError as e:
                        return f"{f}:{n}: not valid JSON ({e.msg} at column {e.colno})"
                    if not isinstance(rec, dict):
                        return f"{f}:{n}: expected a JSON object per line, got {type(rec).__name__}"
            except UnicodeDecodeError as e:
                return f"{f}:{n + 1}: not UTF-8 text ({e.reason})"
    return None


class RecordPlaces:
    """Where example i of local file input came from: `FILE:LINE`, or `FILE row N` for parquet and
    JSON arrays; `example i` for saved and hub datasets. Built only when an error needs it.

    Line numbers follow how `datasets` reads each kind: JSON lines skip blank lines, text files
    make one example per line (blank ones included), CSV has a header and may quote newlines.
    """

    def __init__(self, files: list[Path] | None):
        self.files = files or []
        self._places: list[tuple[Path, list[int] | int]] | None = None

    def _scan(self) -> list[tuple[Path, list[int] | int]]:
        import csv

        places: list[tuple[Path, list[int] | int]] = []
        for f in self.files:
            kind = FILE_TYPES.get(f.suffix)
            if kind == "json" and not _is_json_document(f):
                with f.open(encoding="utf-8", errors="replace") as fh:
                    places.append((f, [n for n, ln in enumerate(fh, 1) if ln.strip()]))
            elif kind == "text":
                with f.open(encoding="utf-8", errors="replace") as fh:
                    places.append((f, [n for n, _ in enumerate(fh, 1)]))
            elif kind == "csv":
                with f.open(newline="", encoding="utf-8", errors="replace") as fh:
                    reader = csv.reader(fh)
                    lines = []
                    for i, _ in enumerate(reader):
                        if i:  # row 0 is the header
                            lines.append(reader.line_num)
                    places.append((f, lines))
            elif kind == "parquet":
                import pyarrow.parquet as pq

                places.append((f, pq.ParquetFile(f).metadata.num_rows))
            else:  # a JSON array
                places.append((f, len(json.loads(f.read_text()))))
        return places

    def __call__(self, i: int) -> str:
        if not self.files:
            return f"example {i}"
        if self._places is None:
            try:
                self._places = self._scan()
            except Exception:  # naming the place must never hide the error being reported
                self._places = []
        j = i
        for f, lines in self._places:
            n = len(lines) if isinstance(lines, list) else lines
            if j < n:
                where = f"{f}:{lines[j]}" if isinstance(lines, list) else f"{f} row {j + 1}"
                return f"{where} (example {i})"
            j -= n
        return f"example {i}"
