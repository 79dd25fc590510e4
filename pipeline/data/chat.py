"""`prepare --format chat`: a conversation rendered with the tokenizer's own chat template, and its loss mask.

Targets are the assistant turns: each one's content and the template's end-of-turn token(s) that close it
(`<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3), so the student learns to stop. Nothing of the system,
user or tool turns is a target, nor an assistant turn's header (`<|im_start|>assistant\\n`: the prompt gives
it at inference), nor the separator after the end-of-turn token (ChatML's newline after `<|im_end|>`: the
model stops at `<|im_end|>` and never produces it). This is what a template whose assistant turns are marked
`{% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}` gives
`apply_chat_template(..., return_assistant_tokens_mask=True)`, and it is checked token for token against
that in `tests/data/test_chat.py` (SmolLM2-Instruct's, Qwen2.5's and Llama-3/3.1's templates).

Two ways to find the turns:

- A template with `{% generation %}` blocks says itself what the assistant produces: the mask is
  transformers' `assistant_masks` (every token overlapping a block), whatever the blocks hold.
- Any other template is rendered on growing prefixes of the conversation. Turn i's content starts where
  the render of messages[:i] with the generation prompt ends and stops where the render of messages[:i + 1]
  ends, less the whitespace that follows its last special token. This needs each render of a prefix to be a
  prefix of the whole render, and the generation prompt to be the header the turn is rendered with; a
  template that rewrites earlier turns once a later one follows (Qwen3's drops the reasoning of earlier
  assistant turns) is refused for such a conversation rather than given a wrong mask.

Character ranges become tokens through the fast tokenizer's offsets; a token is a target when it overlaps a
range (as transformers counts it), and position 0 never is (it has no context).
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import KdError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template (the default one of a named set); a `KdError` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template or not isinstance(template, str):
        raise KdError("format 'chat' needs a tokenizer with a chat_template")
    return template


def check_messages(messages: Any) -> None:
    """A list of objects that each have a role and a content (a `KdError` naming the first that does not)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise KdError(f"'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    for j, m in enumerate(messages):
        missing = [k for k in ("role", "content") if m.get(k) is None]
        if missing:
            raise KdError(f"message {j} has no {' or '.join(repr(k) for k in missing)}")


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one conversation: the template's render, tokenized without added special
    tokens (the template places them), and 1 on the assistant targets (module docstring)."""
    template = chat_template(tokenizer)
    check_messages(messages)
    if not getattr(tokenizer, "is_fast", True):
        raise KdError("format 'chat' needs a fast tokenizer (its offsets place the assistant turns)")
    if GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [int(v) for v in out["assistant_masks"]]
    else:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        specials = special_ids(tokenizer)
        spans = [closing(s, e, full, ids, offsets, specials) for s, e in assistant_spans(tokenizer, messages, full)]
        mask = [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]
    if mask:
        mask[0] = 0
    return ids, mask


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character range in `full` of each assistant turn, from its content to the end of its render (the
    separator to the next turn included); a `KdError` when the template's renders of prefixes are not prefixes."""
    render = tokenizer.apply_chat_template
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(messages[: i + 1], tokenize=False)
        if i:
            head = render(messages[:i], tokenize=False, add_generation_prompt=True)
        else:  # templates refuse an empty conversation: the content starts where two different ones part
            x, y = (render([{**m, "content": c}], tokenize=False) for c in ("x", "y"))
            n = next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
            if n is None:
                raise KdError("the chat template does not show the content of message 0 (assistant)")
            head = x[:n]
        if not full.startswith(upto):
            raise KdError(f"the chat template renders message {i} (assistant) differently once later messages "
                          "follow, so its tokens cannot be told apart; mark the assistant turns in the template "
                          "with {% generation %}...{% endgeneration %}, or use --format prompt-response")
        if not upto.startswith(head):
            raise KdError(f"the chat template renders message {i} (assistant) with another header than its "
                          "generation prompt, so its tokens cannot be told apart; mark the assistant turns in "
                          "the template with {% generation %}...{% endgeneration %}, or use --format "
                          "prompt-response")
        spans.append((len(head), len(upto)))
    return spans


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (its named ones and every added token marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, t in decoder.items() if getattr(t, "special", False))
    return ids


def closing(start: int, end: int, full: str, ids: list[int], offsets: list[tuple[int, int]],
            specials: set[int]) -> tuple[int, int]:
    """(start, end) less the whitespace after the span's last special token (its end-of-turn token): the
    separator to the next turn is not a target. A span with no special token is kept whole (its closing text
    is all that tells the model the turn ended)."""
    last = max((b for t, (a, b) in zip(ids, offsets) if t in specials and start <= a and b <= end and b > a),
               default=None)
    if last is not None and not full[last:end].strip():
        return start, last
    return start, end
