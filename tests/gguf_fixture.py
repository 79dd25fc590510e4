"""A tiny GGUF file written here: a Hugging Face Llama directory and its byte-level BPE tokenizer as llama.cpp would
store them, so that `from_pretrained(dir, gguf_file=...)` can be tested without a download.

    write_gguf(llama_dir, tokenizer_dir, tmp / "tiny.gguf")

What the file holds (what transformers' GGUF loader reads back):
  * llama architecture metadata (block count, widths, heads, rope base, rms eps, context, vocabulary size);
  * every weight as F32 under llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ..., `output`), with the q and
    k projections permuted the way llama.cpp's converter does (`permute` below): transformers undoes that
    permutation on load, so the loaded model computes the original's logits only when it was applied;
  * the tokenizer as `tokenizer.ggml.*`: model "gpt2" (byte-level BPE), the tokens in id order, their types
    (special tokens CONTROL, the rest NORMAL), the merges, bos/eos/padding ids and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k reordering (convert_hf_to_gguf.py, LlamaModel.permute): each head's rotary halves are
    interleaved. transformers' GGUF loader applies the inverse."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tokenizer_metadata(tokenizer_dir: Path) -> dict:
    """tokens (id order), token types, merges ("a b"), special ids and chat template of a saved fast tokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab: dict[str, int] = hf.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab))), "token ids must be 0..V-1"
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    types = [3 if t in special else 1 for t in tokens]  # gguf.TokenType.CONTROL / NORMAL
    ids = {name: vocab[t] for name in ("bos", "eos", "pad") if (t := getattr(hf, f"{name}_token")) is not None}
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids, "chat_template": hf.chat_template}


def write_gguf(model_dir: str | Path, tokenizer_dir: str | Path, out: str | Path, permute_qk: bool = True) -> Path:
    """Write the Llama in `model_dir` (saved with save_pretrained) and the tokenizer in `tokenizer_dir` as one F32
    GGUF file `out`. `permute_qk=False` writes q/k unpermuted (a wrong file: the loaded model differs)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "llama", cfg.model_type
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tok = _tokenizer_metadata(Path(tokenizer_dir))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_name("kdcache tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope_theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    w.add_rope_freq_base(float(rope_theta or 10000.0))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if name in tok["ids"]:
            add(tok["ids"][name])
    w.add_add_bos_token(False)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    def t(name: str, array: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    t("token_embd.weight", sd["model.embed_tokens.weight"])
    t("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        t("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if permute_qk:
            q, k = permute(q, n_head, n_head), permute(k, n_head, n_kv)
        t(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        t(f"blk.{i}.attn_q.weight", q)
        t(f"blk.{i}.attn_k.weight", k)
        t(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        t(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        t(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        t(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        t(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        t(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
