"""Tiny randomly initialised models of every supported family, built without downloads."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config,
)

from interpbook.lm import Model

VOCAB = 101


class ToyTokenizer:
    """Just enough of a tokenizer for Model: characters map to ids 3..; 0 is padding."""

    pad_token, eos_token, pad_token_id, padding_side, chat_template = "<pad>", "<pad>", 0, "left", None


CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       sliding_window=4, final_logit_softcapping=5.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=1),
    "neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True,
                                  bos_token_id=1, eos_token_id=1),
    "neox_seq": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                                      bos_token_id=1, eos_token_id=1),
}


def tiny_model(family: str, seed: int = 0) -> Model:
    """A tiny model whose every weight (norms and biases too) is random, so that a wrong
    weight view or a forgotten norm cannot pass a test by luck."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.eval()
    return Model(hf, ToyTokenizer(), name=f"tiny-{family}")


def random_ids(batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, pos), generator=g)
