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


WORDS = (
    "the a is in of to and city capital located tower eiffel louvre paris rome berlin germany france italy "
    "london england spain madrid language speaks english french german mother tongue native was born "
    "plays piano guitar football team member sport . , ? what where who which it he she they on at for "
    "museum river bridge famous known old new big small red blue green one two three four five six seven "
    "eight nine ten tokyo japan lake mountain king queen actor writer painter musician works company"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (ids < 128), with offsets, BOS/EOS/PAD and <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    assert len(vocab) <= 128
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# Tiny random models have tiny MLP outputs, so ROME's norm clamp is lifted for them; the prompt ends on the
# subject so the edited position feeds the prediction directly.
TINY = dict(mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4, v_weight_decay=0.0)


def _fact(*args, **kwargs):
    import editpack

    return editpack.make_fact(*args, **kwargs)


FACT = _fact("the famous {}", "eiffel tower", "rome", "paris", paraphrases=["the big eiffel tower"])


def logits(model, tok, text):
    """Next-token logits after ``text``."""
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0, -1]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
