"""Train a small byte-level BPE tokenizer offline, with chat special tokens and a chat template.

Why: the CPU demo needs a tokenizer whose vocabulary is tiny (~512) so that the embedding and
output layers of a 1M-parameter teacher are not most of its weights, and so that a full-vocabulary
teacher distribution is cheap to compare against the cached top-K. Nothing is downloaded: the
tokenizer is trained here from the demo corpus and saved so that
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it like any hub tokenizer.

    python -c "from pipeline.data.bpe_tokenizer import train_tokenizer; \
train_tokenizer(['hello world'] * 10, 'runs/tok', vocab_size=300)"

The demo tokenizer under `data/demo/tokenizer/` is built by `python data/make_demo.py`.

Training is deterministic: the same texts and settings give a byte-identical `tokenizer.json`
(checked across processes in `tests/data/test_tokenizer_train.py`), so the tokenizer's hash can
identify it in cache metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.errors import KdError

logger = logging.getLogger(__name__)

BOS, EOS, PAD, USER, ASSISTANT = "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4, in this order

# A system message has no token of its own (five specials keep the vocabulary small); it is shown
# to the model as a user block, which is what a template without a system role usually does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% elif message['role'] in ['user', 'system'] %}{{ '<|user|>' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' ~ message['role']) }}{% endif %}"
    "{{ message['content'] }}{{ '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

SUPPORTED_MODELS = ("bpe",)


def build_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE `tokenizers.Tokenizer` on `texts` (special tokens get ids 0..4)."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise KdError(f"vocab_size={vocab_size} is below the 256 bytes + 5 special tokens ({min_size})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prompt and its response are encoded as one string, so a leading
    # space would only appear on the first word and make it tokenise differently from the rest.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_for_transformers(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained `Tokenizer` with bos/eos/pad set and the chat template attached."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, model: str = "bpe"
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts`, save it to `out_dir` with `save_pretrained`, and return it.

    `model` names the tokenization model; only "bpe" (byte-level BPE) is supported. The result
    has `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|user|>`, `<|assistant|>` as special tokens (ids 0..4)
    and a chat template producing `<|user|>...<|eos|><|assistant|>...<|eos|>`. Encoding adds no
    special tokens by itself; the chat template (or the caller) places them.
    """
    if model not in SUPPORTED_MODELS:
        raise KdError(f"unknown tokenizer model {model!r}; supported: {', '.join(SUPPORTED_MODELS)}")
    hf_tok = wrap_for_transformers(build_bpe(texts, vocab_size))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    logger.info("trained %s tokenizer: %d tokens -> %s", model, len(hf_tok), out)
    return hf_tok
