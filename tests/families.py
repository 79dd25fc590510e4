"""The model families users distil, as tiny random configs (nothing is downloaded).

Each `Family` builds a two-layer, few-head model of its transformers class over the test tokenizer's
vocabulary (padded above it where the family's real checkpoints pad: GPT-2 50,257 -> 50,304, Pythia /
GPT-NeoX 50,277 -> 50,304, Qwen 151,665 -> 151,936), with the family's own output-head transform set
so that it bites: Gemma-2's final-logit soft-cap at 8 (the logits before it reach ~15 here), Granite's
`logits_scaling`, Cohere's `logit_scale` and Falcon-H1's `lm_head_multiplier` away from 1. The head is
scaled (`head_gain`) so that the distributions are peaked (mean entropy ~2 nats of log V ~ 5.7), not
near-uniform as at random init, after the family's transform.

tests/teacher/test_families.py runs each as teacher and as student; docs/families.md is the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Shared shape: hidden 32, 2 layers, 4 query heads over 2 key/value heads of 8 dims, MLP 64.
_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}
_MOE = {"num_experts_per_tok": 2}


@dataclass(frozen=True)
class Family:
    """One model family: its transformers config class, tiny settings, and what its head does."""

    name: str
    config_class: str  # transformers config class
    settings: dict[str, Any]  # config arguments besides vocab_size
    transform: str = "none"  # the output head's logit transform, as the model's forward applies it
    pad_to: int = 0  # > 0: the model's vocabulary is the tokenizer's rounded up to a multiple of this
    head_gain: float = 32.0  # multiplies the output embedding (tied: the input embedding too)
    notes: str = ""

    def model_vocab(self, vocab_size: int) -> int:
        """The model's (possibly padded) vocabulary for a tokenizer of `vocab_size` ids."""
        if not self.pad_to:
            return vocab_size
        return (vocab_size // self.pad_to + 1) * self.pad_to  # always strictly above: the padding is exercised

    def config(self, vocab_size: int) -> Any:
        import transformers

        return getattr(transformers, self.config_class)(vocab_size=self.model_vocab(vocab_size), **self.settings)

    def build(self, vocab_size: int, seed: int = 0) -> Any:
        """The random-initialised model (float32, eval mode) with its head scaled by `head_gain`."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.config(vocab_size))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(self.head_gain)
        return model.eval()

    def save(self, vocab_size: int, out: Path, seed: int = 0) -> Path:
        """`build`, saved with `save_pretrained` (the path a hub id takes through `from_pretrained`)."""
        self.build(vocab_size, seed).save_pretrained(out)
        return out


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", dict(_DECODER, tie_word_embeddings=False)),
    Family("mistral", "MistralConfig", dict(_DECODER, head_dim=8, sliding_window=8, tie_word_embeddings=False),
           notes="sliding window 8 < the examples' length"),
    Family("qwen2", "Qwen2Config", dict(_DECODER, tie_word_embeddings=True), head_gain=12.0,
           notes="tied head, q/k/v biases"),
    Family("qwen3", "Qwen3Config", dict(_DECODER, head_dim=8, tie_word_embeddings=True), pad_to=64, head_gain=12.0,
           notes="q/k norm, tied, padded vocabulary"),
    Family("qwen2_moe", "Qwen2MoeConfig", dict(_DECODER, **_MOE, num_experts=4, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32, tie_word_embeddings=False),
           notes="4 experts, top-2, shared expert"),
    Family("qwen3_moe", "Qwen3MoeConfig", dict(_DECODER, **_MOE, head_dim=8, num_experts=4, moe_intermediate_size=32,
                                               norm_topk_prob=True, tie_word_embeddings=False),
           notes="4 experts, top-2"),
    Family("mixtral", "MixtralConfig", dict(_DECODER, **_MOE, head_dim=8, num_local_experts=4,
                                            tie_word_embeddings=False), notes="4 experts, top-2"),
    Family("gemma", "GemmaConfig", dict(_DECODER, head_dim=8, tie_word_embeddings=True), head_gain=12.0,
           notes="embeddings x sqrt(H), (1 + w) RMSNorm, tied"),
    Family("gemma2", "Gemma2Config", dict(_DECODER, head_dim=8, sliding_window=8, final_logit_softcapping=8.0,
                                          attn_logit_softcapping=50.0, query_pre_attn_scalar=8,
                                          tie_word_embeddings=True),
           transform="soft-cap: 8 tanh(z / 8)", notes="sliding window 8, attention soft-cap"),
    Family("gemma3_text", "Gemma3TextConfig", dict(_DECODER, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                                                   layer_types=["sliding_attention", "full_attention"],
                                                   tie_word_embeddings=True), head_gain=16.0,
           notes="Gemma3ForCausalLM; no final soft-cap (as the released checkpoints); sliding window 8, q/k norm"),
    Family("phi3", "Phi3Config", dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False), notes="fused qkv / gate_up"),
    Family("gpt2", "GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "bos_token_id": 0,
                                  "eos_token_id": 0}, pad_to=64, head_gain=12.0,
           notes="tied head, padded vocabulary, LayerNorm with bias"),
    Family("gpt_neox", "GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "max_position_embeddings": 128,
                                         "tie_word_embeddings": False}, pad_to=64,
           notes="parallel residual, partial rotary, untied embed_out, padded vocabulary"),
    Family("olmo2", "Olmo2Config", dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        tie_word_embeddings=False), notes="post-norm, q/k norm"),
    Family("granite", "GraniteConfig", dict(_DECODER, logits_scaling=4.0, embedding_multiplier=12.0,
                                            residual_multiplier=0.22, attention_multiplier=0.125,
                                            tie_word_embeddings=False),
           transform="logits / logits_scaling (4)", head_gain=128.0,
           notes="embedding, residual and attention multipliers too"),
    Family("cohere", "CohereConfig", dict(_DECODER, logit_scale=0.25, use_qk_norm=False, eos_token_id=2,
                                          tie_word_embeddings=True),
           transform="logits x logit_scale (0.25)", head_gain=48.0, notes="parallel block, LayerNorm, tied"),
    Family("falcon_h1", "FalconH1Config", dict(_DECODER, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                               mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16,
                                               lm_head_multiplier=0.25, tie_word_embeddings=False),
           transform="logits x lm_head_multiplier (0.25)", head_gain=128.0,
           notes="hybrid attention + Mamba-2 (torch path on CPU), muP multipliers"),
]}


def float64_copy(model: Any) -> Any:
    """A float64 copy of `model` (eval mode) for the oracle: the model's own forward, in exact-enough arithmetic.
    Mixture-of-experts layers run their eager (per-expert loop) implementation: torch's grouped matmul, their
    default, takes no float64."""
    import copy

    m = copy.deepcopy(model).double().eval()
    if any("experts" in type(mod).__name__.lower() for mod in m.modules()):
        m.set_experts_implementation("eager")
    return m
