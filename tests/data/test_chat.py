"""`prepare --format chat` with real chat templates: the targets are exactly the assistant tokens.

    .venv/bin/python -m pytest tests/data/test_chat.py -q

The templates (`tests/data/chat_templates.py`: SmolLM2-Instruct's, Qwen2.5's, Llama-3's and Llama-3.1's) are set
on the tokenizer trained by `tests/conftest.py`, with the special tokens each one uses added to it. Each has a
variant whose assistant turns are marked `{% generation %}content + end-of-turn{% endgeneration %}`; the loss
mask of the plain template must equal, token for token, transformers' `assistant_masks` for the marked one.
A test with the real SmolLM2-135M-Instruct tokenizer runs where it is on disk (marked `realllm`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.data.chat import encode_chat
from pipeline.data.prepare import PrepareConfig, load_prepared, prepare
from pipeline.errors import KdError
from tests.data.chat_templates import (
    REASONING,
    REASONING_MARKED,
    REASONING_TOKENS,
    SMOLLM2,
    SMOLLM2_MARKED,
    TEMPLATES,
)

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = {
    "multi-turn": [msg(U, "what is one plus two"), msg(A, "three"), msg(U, "sort big small"),
                   msg(A, "big small red"), msg(U, "and reverse it"), msg(A, "red small big")],
    "system": [msg(S, "be brief"), msg(U, "hello world"), msg(A, "hello"), msg(U, "what is two"), msg(A, "two")],
    "empty-turn": [msg(S, "answer or stay quiet"), msg(U, "the cat"), msg(A, ""), msg(U, "the dog"),
                   msg(A, "sat on a mat")],
    "unicode": [msg(U, "héllo wörld — 日本語 ?"), msg(A, " ça va 🙂 ñ "), msg(U, "naïve\ncafé"),
                msg(A, "Ünïcödé\nsecond line\n")],
    "assistant-first": [msg(A, "hello world"), msg(U, "red"), msg(A, "")],
    "ends-on-user": [msg(S, "be brief"), msg(U, "one"), msg(A, "two"), msg(U, "three")],
}


GEN = {"smollm2": "<|im_start|>assistant\n", "qwen25": "<|im_start|>assistant\n",
       "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
       "llama31": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


def make_tok(tokenizer_dir, template, tokens):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens(tokens)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def toks(tokenizer_dir):
    """name -> (tokenizer with the template, tokenizer with its marked variant, end-of-turn token)."""
    return {name: (make_tok(tokenizer_dir, plain, tokens), make_tok(tokenizer_dir, marked, tokens), eot)
            for name, (plain, marked, tokens, eot) in TEMPLATES.items()}


def reference(tok_marked, messages):
    """transformers' own answer: (input_ids, assistant_masks) of the generation-marked template."""
    out = tok_marked.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def runs(tok, ids, mask):
    """Each run of consecutive targets, decoded: (the run, all the text before it, all the text after it)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))

    def dec(a, b):
        return tok.decode([int(i) for i in ids[a:b]], skip_special_tokens=False)

    return [(dec(a, b), dec(0, a), dec(b, len(ids))) for a, b in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_marked_variant_renders_the_same_text(toks, name):
    plain, marked, _ = toks[name]
    for messages in CONVERSATIONS.values():
        assert marked.apply_chat_template(messages, tokenize=False) == plain.apply_chat_template(messages,
                                                                                                 tokenize=False)
        assert (marked.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_mask_is_transformers_assistant_mask(toks, name, conv):
    """Token for token, for the plain template (found by prefixes) and the marked one (its own blocks)."""
    plain, marked, _ = toks[name]
    messages = CONVERSATIONS[conv]
    ref_ids, ref_mask = reference(marked, messages)
    assert ref_mask[0] == 0 and sum(ref_mask) > 0
    for tok in (plain, marked):
        ids, mask = encode_chat(tok, messages)
        assert ids == ref_ids
        assert mask == ref_mask


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_targets_are_each_assistant_content_and_its_end_of_turn(toks, name, conv):
    plain, _, eot = toks[name]
    messages = CONVERSATIONS[conv]
    ids, mask = encode_chat(plain, messages)
    llama = name.startswith("llama")  # Llama-3's templates trim the content
    want = [(m["content"].strip() if llama else m["content"]) + eot for m in messages if m["role"] == A]
    got = runs(plain, ids, mask)
    assert [text for text, _, _ in got] == want
    header = plain.apply_chat_template([msg(U, "x")], tokenize=False, add_generation_prompt=True)[-len(GEN[name]):]
    for _, before, after in got:
        assert before.endswith(header) and header == GEN[name]  # the turn's header is not a target ...
        if llama:  # ... nor what follows its end-of-turn token: the next turn, or ChatML's newline
            assert after == "" or after.startswith("<|start_header_id|>")
        else:
            assert after.startswith("\n") and (after == "\n" or after.startswith("\n<|im_start|>"))
    # nothing but assistant turns: every system and user content is outside the targets
    trained = "".join(want)
    assert not any(m["content"] in trained for m in messages if m["role"] != A and len(m["content"]) > 3)


def test_prepare_chat_rows_match_transformers(tmp_path, tokenizer_dir):
    """End to end: `prepare` on a JSONL of conversations with SmolLM2's template saved on the tokenizer."""
    tok_dir = tmp_path / "tok"
    make_tok(tokenizer_dir, SMOLLM2, TEMPLATES["smollm2"][2]).save_pretrained(tok_dir)
    marked = make_tok(tokenizer_dir, SMOLLM2_MARKED, TEMPLATES["smollm2"][2])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS.values()))
    meta = prepare(PrepareConfig(data=str(data), tokenizer=str(tok_dir), out=str(tmp_path / "out"), max_length=512))
    assert meta["format"] == "chat" and meta["examples"] == len(CONVERSATIONS) and meta["truncated"] == 0
    for row, messages in zip(load_prepared(tmp_path / "out"), CONVERSATIONS.values()):
        assert (row["input_ids"], row["loss_mask"]) == reference(marked, messages)


# ---- templates whose turns cannot be told apart --------------------------------------------------------------

THINKING = [msg(U, "one plus two"), msg(A, "<think>\nadd them\n</think>\n\nthree"), msg(U, "and two"),
            msg(A, "<think>\nagain\n</think>\n\ntwo")]


def test_template_rewriting_earlier_turns_is_refused(tmp_path, tokenizer_dir):
    tok = make_tok(tokenizer_dir, REASONING, REASONING_TOKENS)
    with pytest.raises(KdError, match=r"^the chat template renders message 1 \(assistant\) differently once later "
                                      r"messages follow") as e:
        encode_chat(tok, THINKING)
    assert "\n" not in str(e.value) and "{% generation %}" in str(e.value)
    # A conversation it does not rewrite splits, and gives the marked variant's mask.
    marked = make_tok(tokenizer_dir, REASONING_MARKED, REASONING_TOKENS)
    for messages in CONVERSATIONS.values():
        assert encode_chat(tok, messages) == reference(marked, messages)
    # Through `prepare`: one line naming the record, and no output.
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CONVERSATIONS["system"], THINKING)))
    with pytest.raises(KdError, match=r"c\.jsonl:2 \(example 1\): the chat template renders message 1") as e:
        prepare(PrepareConfig(data=str(data), tokenizer=str(tok_dir), out=str(tmp_path / "out")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "kdcache_prepare.json").exists()


def test_marked_template_rewriting_earlier_turns_uses_its_blocks(tokenizer_dir):
    """With generation blocks the template says what is trained: each turn as rendered in the whole."""
    marked = make_tok(tokenizer_dir, REASONING_MARKED, REASONING_TOKENS)
    ids, mask = encode_chat(marked, THINKING)
    assert (ids, mask) == reference(marked, THINKING)
    assert [text for text, _, _ in runs(marked, ids, mask)] == ["three<|im_end|>",
                                                              "<think>\nagain\n</think>\n\ntwo<|im_end|>"]


def test_generation_prompt_other_than_the_turn_header_is_refused(tokenizer_dir):
    template = SMOLLM2.replace("{{ '<|im_start|>assistant\n' }}{% endif %}",
                               "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}")
    tok = make_tok(tokenizer_dir, template, TEMPLATES["smollm2"][2])
    with pytest.raises(KdError, match=r"^the chat template renders message 1 \(assistant\) with another header "
                                      r"than its generation prompt"):
        encode_chat(tok, CONVERSATIONS["multi-turn"])


# ---- the real SmolLM2-135M-Instruct tokenizer -------------------------------------------------------------------

REAL_LLM = Path(os.environ.get("KDCACHE_REAL_LLM") or Path(__file__).resolve().parents[2] / "runs/real_llm/teacher")


@pytest.mark.realllm
@pytest.mark.skipif(not (REAL_LLM / "tokenizer.json").is_file(), reason=f"no real SmolLM2 tokenizer at {REAL_LLM}")
def test_real_smollm2_template_matches_its_marked_variant():
    tok = AutoTokenizer.from_pretrained(REAL_LLM)
    assert tok.chat_template == SMOLLM2  # the fixture is the real template, byte for byte
    marked = AutoTokenizer.from_pretrained(REAL_LLM)
    marked.chat_template = SMOLLM2_MARKED
    for messages in CONVERSATIONS.values():
        ids, mask = encode_chat(tok, messages)
        assert (ids, mask) == reference(marked, messages)
        want = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == A)
        assert tok.decode([i for i, t in zip(ids, mask) if t], skip_special_tokens=False) == want
