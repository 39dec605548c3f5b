"""Tiny random models built from configs, one per architecture family the specs describe (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Sizes small enough that every test model builds in milliseconds.
COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)

OVERRIDES = {
    "gpt2": dict(n_positions=64, n_inner=64),
    "gptj": dict(n_positions=64, rotary_dim=4, n_inner=64),
    "gpt_neox": dict(max_position_embeddings=64),
    "llama": dict(max_position_embeddings=64, num_key_value_heads=2),
    "mistral": dict(max_position_embeddings=64, num_key_value_heads=2),
    "qwen2": dict(max_position_embeddings=64, num_key_value_heads=2),
    "gemma3_text": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8, sliding_window=16),
}


def tiny_config(model_type: str, **extra):
    values = dict(COMMON)
    values.update(OVERRIDES.get(model_type, {}))
    values.update(extra)
    return AutoConfig.for_model(model_type, **values)


def tiny_model(model_type: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **extra), dtype=torch.float32)
    return model.eval()
