"""`kdcache prepare`: input kinds, formats and their loss masks, the metadata record, re-runs, errors.

    .venv/bin/python -m pytest tests/data/test_prepare.py -q

Loss masks are checked by decoding: the target tokens of an example must decode to exactly the
text that is supposed to be learned (the response, the assistant turns) and nothing else.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from pipeline.errors import KdError
from pipeline.data.prepare import META_FILENAME, PrepareConfig, encode_chat, load_prepared, prepare
from pipeline.cache.rows import target_counts
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is one plus two"},
        {"role": "assistant", "content": "three"}, {"role": "user", "content": "sort big small"},
        {"role": "assistant", "content": "big small red"}]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def run(tmp_path, tokenizer_dir, data, name="out", **kw):
    out = tmp_path / name
    meta = prepare(PrepareConfig(data=str(data), tokenizer=str(tokenizer_dir), out=str(out), **kw))
    return out, meta


def rows(out):
    ds = datasets.load_from_disk(str(out))
    assert set(ds.column_names) == {"input_ids", "loss_mask"}
    return [(np.asarray(r["input_ids"]), np.asarray(r["loss_mask"])) for r in ds]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


# ---- formats and loss masks -----------------------------------------------------------------------

def test_text_mask(tmp_path, tokenizer_dir, tok):
    out, meta = run(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}]))
    (ids, mask), = rows(out)
    assert meta["format"] == "text"
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert mask[0] == 0 and mask[1:].all()  # every token after the first is predicted
    assert decode(tok, ids[mask == 1]) == "the cat sat<|eos|>"


def test_prompt_response_mask(tmp_path, tokenizer_dir, tok):
    out, meta = run(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "pr.jsonl",
                                                         [{"prompt": "what is two ?", "response": "four"}]))
    (ids, mask), = rows(out)
    assert meta["format"] == "prompt-response"
    assert decode(tok, ids[mask == 0]) == "<|bos|>what is two ?"
    assert decode(tok, ids[mask == 1]) == "four<|eos|>"
    assert (np.diff(mask) >= 0).all()  # prompt first, then only targets


def test_prompt_response_without_eos(tmp_path, tokenizer_dir, tok):
    out, _ = run(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "a", "response": "big"}]),
                 add_eos=False)
    (ids, mask), = rows(out)
    assert decode(tok, ids[mask == 1]) == "big"


def test_chat_mask_only_assistant_turns(tmp_path, tokenizer_dir, tok):
    out, meta = run(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    (ids, mask), = rows(out)
    assert meta["format"] == "chat"
    assert decode(tok, ids) == tok.apply_chat_template(CHAT, tokenize=False)
    # Targets: each assistant turn's content and its closing <|eos|>; never the <|assistant|> opener.
    assert decode(tok, ids[mask == 1]) == "three<|eos|>big small red<|eos|>"
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    runs = [decode(tok, ids[a:b]) for a, b in zip(spans[::2], spans[1::2])]
    assert runs == ["three<|eos|>", "big small red<|eos|>"]
    assert all(decode(tok, ids[a - 1: a]) == "<|assistant|>" for a in spans[::2])


def test_chat_starting_with_assistant(tok):
    ids, mask = encode_chat(tok, [{"role": "assistant", "content": "hello world"}, {"role": "user", "content": "red"}])
    ids, mask = np.asarray(ids), np.asarray(mask)
    assert decode(tok, ids[mask == 1]) == "hello world<|eos|>"
    assert mask[0] == 0


def test_chat_bad_record_names_example(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(KdError, match="example 1"):
        run(tmp_path, tokenizer_dir, data)


def test_auto_format_detection_and_override(tmp_path, tokenizer_dir, tok):
    data = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "one", "response": "two", "text": "three four"}])
    _, meta = run(tmp_path, tokenizer_dir, data, name="auto")
    assert meta["format"] == "prompt-response"
    out, meta = run(tmp_path, tokenizer_dir, data, name="text", format="text")
    assert meta["format"] == "text"
    (ids, mask), = rows(out)
    assert decode(tok, ids[mask == 1]) == "three four<|eos|>"


def test_truncation_is_counted(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat on a mat " * 5}, {"text": "red"}])
    out, meta = run(tmp_path, tokenizer_dir, data, max_length=8)
    lengths = [len(i) for i, _ in rows(out)]
    assert lengths[0] == 8 and lengths[1] < 8
    assert meta["truncated"] == 1


# ---- input kinds ----------------------------------------------------------------------------------

TEXTS = ["the cat sat", "a red bird", "one two three"]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "txt", "dir", "saved", "saved-dict"])
def test_input_kinds_give_the_same_rows(tmp_path, tokenizer_dir, kind):
    recs = [{"text": t} for t in TEXTS]
    if kind == "jsonl":
        data = write_jsonl(tmp_path / "d.jsonl", recs)
    elif kind == "json":
        data = tmp_path / "d.json"
        data.write_text(json.dumps(recs))
    elif kind == "parquet":
        data = tmp_path / "d.parquet"
        pd.DataFrame(recs).to_parquet(data)
    elif kind == "csv":
        data = tmp_path / "d.csv"
        pd.DataFrame(recs).to_csv(data, index=False)
    elif kind == "txt":
        data = tmp_path / "d.txt"
        data.write_text("\n".join(TEXTS) + "\n")
    elif kind == "dir":
        data = tmp_path / "d"
        data.mkdir()
        write_jsonl(data / "a.jsonl", recs[:2])
        write_jsonl(data / "b.jsonl", recs[2:])
    elif kind == "saved":
        data = tmp_path / "d"
        datasets.Dataset.from_list(recs).save_to_disk(str(data))
    else:
        data = tmp_path / "d"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(recs[:1]),
                              "validation": datasets.Dataset.from_list(recs)}).save_to_disk(str(data))
    out, meta = run(tmp_path, tokenizer_dir, data, split="validation" if kind == "saved-dict" else "train")
    ref, _ = run(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "ref.jsonl", recs), name="ref")
    assert meta["examples"] == 3
    got, want = rows(out), rows(ref)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want))


def test_datasets_hub_name(tmp_path, tokenizer_dir, monkeypatch):
    """A name that is not a local path goes to `datasets.load_dataset(name, split=...)` (no network here)."""
    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "one", "response": "two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _, meta = run(tmp_path, tokenizer_dir, "someorg/somedata", split="test")
    assert calls == [("someorg/somedata", "test")]
    assert meta["format"] == "prompt-response" and meta["source_sha256"] is None


# ---- the record -----------------------------------------------------------------------------------

def test_record_and_config(tmp_path, tokenizer_dir, tok, data_file):
    out, meta = run(tmp_path, tokenizer_dir, data_file, max_length=64)
    on_disk = json.loads((out / META_FILENAME).read_text())
    assert on_disk == meta
    t = meta["tokenizer"]
    assert t["name"] == str(tokenizer_dir) and t["vocab_size"] == len(tok) and len(t["vocab_sha256"]) == 64
    ds = load_prepared(out)
    counts, lengths = target_counts(ds)
    assert meta["examples"] == len(ds) == 60
    assert meta["tokens"] == int(lengths.sum())
    assert meta["targets"] == int(counts.sum()) == sum(int(np.sum(m)) for m in ds["loss_mask"])
    assert len(meta["fingerprint"]) == 64 and len(meta["source_sha256"]) == 64
    assert meta["config_identity"]["max_length"] == 64 and "out" not in meta["config_identity"]
    assert (out / "config.yaml").is_file()
    # Same inputs, another directory: same fingerprint (it describes the produced columns).
    _, again = run(tmp_path, tokenizer_dir, data_file, name="again", max_length=64)
    assert again["fingerprint"] == meta["fingerprint"]


def test_rerun_skip_refuse_overwrite(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    out, first = run(tmp_path, tokenizer_dir, data)
    _, again = run(tmp_path, tokenizer_dir, data)
    assert again.get("skipped") and again["fingerprint"] == first["fingerprint"]
    with pytest.raises(KdError, match="other settings"):
        run(tmp_path, tokenizer_dir, data, max_length=4)
    write_jsonl(data, [{"text": t} for t in TEXTS[:2]])  # the input changes in place
    with pytest.raises(KdError, match="input changed"):
        run(tmp_path, tokenizer_dir, data)
    _, replaced = run(tmp_path, tokenizer_dir, data, overwrite=True)
    assert replaced["examples"] == 2 and not replaced.get("skipped")
    assert not list(tmp_path.glob("*.tmp-prepare"))


def test_empty_examples_and_target_counts(tmp_path, tokenizer_dir):
    """Examples with no tokens or no targets keep their place (row alignment) and count 0 rows."""
    data = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "a", "response": ""}, {"prompt": "b", "response": "red"},
                                              {"prompt": "", "response": ""}])
    out, meta = run(tmp_path, tokenizer_dir, data, add_eos=False)
    ds = load_prepared(out)
    counts, lengths = target_counts(ds)
    assert counts.tolist()[0] == 0 and counts.tolist()[2] == 0 and counts[1] > 0
    assert lengths[2] == 1  # just the BOS
    assert meta["targets"] == int(counts.sum())
    # a select() view: counts of the viewed rows, not of the underlying table
    assert target_counts(ds.select([1, 2]))[0].tolist() == counts[1:].tolist()
    assert target_counts(ds.select([]))[0].tolist() == []


# ---- errors: one line, nothing left behind ---------------------------------------------------------

@pytest.mark.parametrize("case, needle", [
    ("missing", "not found"), ("garbage", "d.jsonl:2: not valid JSON"), ("empty", "is empty (an empty file)"),
    ("no-targets", "no target positions"), ("no-field", "cannot tell the data format"),
])
def test_bad_input_one_line(tmp_path, tokenizer_dir, case, needle):
    data = tmp_path / "d.jsonl"
    if case == "garbage":
        data.write_text('{"text": "ok"}\n{not json at all\n')
    elif case == "empty":
        data.write_text("")
    elif case == "no-targets":
        write_jsonl(data, [{"prompt": "a", "response": ""}])
    elif case == "no-field":
        write_jsonl(data, [{"question": "a"}])
    out = tmp_path / "out"
    extra = ["--set", "add_eos=false"] if case == "no-targets" else []
    res = CliRunner().invoke(main, ["prepare", "--data", str(data), "--tokenizer", str(tokenizer_dir),
                                    "--out", str(out), *extra])
    assert res.exit_code == 1, res.output
    errs = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errs) == 1 and needle in errs[0] and "Traceback" not in res.output, res.output
    assert "StopIteration" not in res.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp-prepare"))


@pytest.mark.parametrize("name, needle", [
    ("runs/my tok", "not a Hugging Face Hub id (OWNER/NAME); check the path"),
    ("a/b/c", "not a Hugging Face Hub id"),
])
def test_a_mistyped_tokenizer_path_is_not_called_a_bad_repo_id(tmp_path, data_file, name, needle):
    res = CliRunner().invoke(main, ["prepare", "--data", str(data_file), "--tokenizer", name,
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and f"tokenizer {name!r} not found: no such directory here" in res.output, res.output
    assert needle in res.output and "Repo id must" not in res.output


def test_missing_tokenizer_one_line(tmp_path, data_file):
    res = CliRunner().invoke(main, ["prepare", "--data", str(data_file), "--tokenizer", str(tmp_path / "nope"),
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "tokenizer directory not found" in res.output and "Traceback" not in res.output


# ---- malformed records are named by file and line -------------------------------------------------

GOOD = '{"prompt": "one", "response": "two"}'


@pytest.mark.parametrize("lines, needle", [
    ([GOOD, GOOD, '{"prompt": "three", "response": '], ":3: not valid JSON"),
    ([GOOD, GOOD, '["prompt", "response"]'], ":3: expected a JSON object per line, got list"),
    ([GOOD, "", GOOD, '{"prompt": "three"}'], ":4 (example 2): field 'response' is missing or null"),
    ([GOOD, GOOD, '{"prompt": null, "response": "x"}'], ":3 (example 2): field 'prompt' is missing or null"),
])
def test_malformed_line_is_one_line_naming_file_and_line(tmp_path, tokenizer_dir, lines, needle):
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prepare", "--data", str(data), "--tokenizer", str(tokenizer_dir),
                                    "--out", str(out)])
    assert res.exit_code == 1, res.output
    shown = res.output.split("\r")[-1]  # what a terminal shows once the progress bar has erased itself
    assert shown.strip().count("\n") == 0, res.output  # no datasets log line, no traceback
    assert shown.startswith(f"kdcache prepare: error: {data}{needle}"), res.output
    assert not out.exists()


def test_chat_message_without_content_names_the_line(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT},
                                              {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}])
    with pytest.raises(KdError, match=r"c\.jsonl:3 \(example 2\): message 1 has no 'content'"):
        run(tmp_path, tokenizer_dir, data)


def test_record_places_follow_each_input_kind(tmp_path):
    """Example i maps to the line datasets read it from: text keeps blank lines, CSV has a header and quoted
    newlines, several files continue the count."""
    from pipeline.data.corpus import RecordPlaces

    txt = tmp_path / "a.txt"
    txt.write_text("one\n\nthree\n")
    csv = tmp_path / "b.csv"
    csv.write_text('text\n"multi\nline"\nplain\n')
    assert RecordPlaces([txt])(2) == f"{txt}:3 (example 2)"
    assert RecordPlaces([csv])(1) == f"{csv}:4 (example 1)"
    both = RecordPlaces([write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 2),
                         write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}] * 2)])
    assert both(3) == f"{tmp_path / 'b.jsonl'}:2 (example 3)"
    assert RecordPlaces(None)(5) == "example 5"


def test_max_examples_is_a_seeded_subset_in_corpus_order(tmp_path, tokenizer_dir, tok):
    recs = [{"prompt": f"item {i} is", "response": f" number {i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "pr.jsonl", recs)
    out, meta = run(tmp_path, tokenizer_dir, data, name="a", max_examples=10, sample_seed=3)
    got = [decode(tok, ids[mask == 1]) for ids, mask in rows(out)]
    kept = [int(g.split()[1].removesuffix("<|eos|>")) for g in got]
    assert meta["examples"] == 10 and len(set(kept)) == 10 and kept == sorted(kept)
    again, _ = run(tmp_path, tokenizer_dir, data, name="b", max_examples=10, sample_seed=3)
    other, _ = run(tmp_path, tokenizer_dir, data, name="c", max_examples=10, sample_seed=4)
    assert [r[0].tolist() for r in rows(again)] == [r[0].tolist() for r in rows(out)]
    assert [r[0].tolist() for r in rows(other)] != [r[0].tolist() for r in rows(out)]
    whole, _ = run(tmp_path, tokenizer_dir, data, name="d", max_examples=40)
    assert len(rows(whole)) == 40


def test_max_examples_errors_still_name_the_file_line(tmp_path, tokenizer_dir):
    recs = [{"prompt": "a", "response": "b"}] * 3 + [{"prompt": "a", "response": None}] * 3
    data = write_jsonl(tmp_path / "pr.jsonl", recs)
    # seed 2 keeps examples 0, 1, 2, 5: the first bad one is the subset's fourth, the file's sixth line
    with pytest.raises(KdError, match=r"pr\.jsonl:6 \(example 5\)"):
        run(tmp_path, tokenizer_dir, data, max_examples=4, sample_seed=2)


# ---- huge records and empty texts ----------------------------------------------------------------------
def test_long_records_keep_the_tokens_of_the_whole_text(tok):
    """The prefix tokenization keeps exactly the first tokens the whole text gives (real text: this Python's
    own sources, whose long lines, indentation runs and docstrings stress the cut)."""
    import inspect
    import json as json_mod

    from pipeline.data.prepare import _encode

    text = inspect.getsource(json_mod.decoder) + inspect.getsource(json_mod.encoder)
    full = tok(text, add_special_tokens=False)["input_ids"]
    for limit in (1, 7, 100, 333, len(full) - 1, len(full), len(full) + 5):
        got = _encode(tok, text, limit)
        assert got == full[: limit + 1], limit


def test_a_huge_record_is_tokenized_only_as_far_as_it_is_kept(tmp_path, tokenizer_dir):
    """One 4 MB record with --max-length 64: the tokenizer never sees more than a bounded prefix of it."""
    from transformers import PreTrainedTokenizerFast

    seen = []
    original = PreTrainedTokenizerFast.__call__

    def spy(self, text, *a, **kw):
        seen.append(len(text) if isinstance(text, str) else 0)
        return original(self, text, *a, **kw)

    data = write_jsonl(tmp_path / "huge.jsonl", [{"text": "red big small " * 300_000}, {"text": "one two"}])
    PreTrainedTokenizerFast.__call__ = spy
    try:
        out, meta = run(tmp_path, tokenizer_dir, data, max_length=64)
    finally:
        PreTrainedTokenizerFast.__call__ = original
    assert meta["truncated"] == 1 and max(seen) <= 64 * 4 * 8 * 4
    (ids0, mask0), (ids1, _) = rows(out)
    assert len(ids0) == 64 and mask0[1:].all() and len(ids1) < 64


def test_empty_texts_are_skipped_and_reported(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "e.jsonl", [{"text": "red big"}, {"text": ""}, {"text": "  \n"}, {"text": "small"}])
    out, meta = run(tmp_path, tokenizer_dir, data)
    assert meta["examples"] == 2 and meta["empty_skipped"] == 2 and len(rows(out)) == 2
    res = CliRunner().invoke(main, ["prepare", "--data", str(data), "--tokenizer", str(tokenizer_dir),
                                    "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0 and "2 empty texts skipped" in res.output, res.output
    only_empty = write_jsonl(tmp_path / "only.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(KdError, match=r"no target positions .*2 empty texts skipped"):
        run(tmp_path, tokenizer_dir, only_empty, name="none")
