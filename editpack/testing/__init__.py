"""Tiny random models and a word-level tokenizer built from configs, for tests of editpack and of new methods.

Nothing is downloaded: :func:`tiny_model` builds any family the architecture files describe from a transformers
config (4 layers, width 32, a 128-token vocabulary), in milliseconds; :func:`tiny_tokenizer` is a fast tokenizer
over :data:`WORDS`. Each registered method's :attr:`~editpack.methods.base.EditMethod.tiny_settings` edit such a
model in a few steps; :func:`tiny_facts` gives the facts to edit. The test battery (``tests/``) and the installed
wheel's smoke check (``scripts/wheel_smoke.py``) run every registered method this way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .._lazy import tokenizers, transformers
from ..api import train
from ..facts import Fact, make_fact
from ..methods import get_method
from ..methods.locate.values import TINY_LOCATE
from ..methods.training import TrainSettings

__all__ = ["COMMON", "FACT", "OVERRIDES", "TINY_LOCATE", "WORDS", "missing_packages", "tiny_config",
           "tiny_edit_settings", "tiny_facts", "tiny_model", "tiny_tokenizer"]

#: Sizes small enough that every test model builds in milliseconds.
COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=64)

#: What each family's config needs besides :data:`COMMON` (positions, grouped heads, head width, windows).
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_positions=64, n_inner=64),
    "gptj": dict(n_positions=64, rotary_dim=4, n_inner=64),
    "gpt_neox": dict(max_position_embeddings=64),
    "llama": dict(max_position_embeddings=64, num_key_value_heads=2),
    "mistral": dict(max_position_embeddings=64, num_key_value_heads=2),
    "qwen2": dict(max_position_embeddings=64, num_key_value_heads=2),
    "gemma3_text": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "qwen3": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "phi3": dict(max_position_embeddings=64, num_key_value_heads=2),
    "olmo2": dict(max_position_embeddings=64, num_key_value_heads=2),
    "granite": dict(max_position_embeddings=64, num_key_value_heads=2),
    "smollm3": dict(max_position_embeddings=64, num_key_value_heads=2),
    "glm4": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8),
    "cohere": dict(max_position_embeddings=64, num_key_value_heads=2),
    "exaone4": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "starcoder2": dict(max_position_embeddings=64, num_key_value_heads=2),
    "falcon": dict(max_position_embeddings=64, ffn_hidden_size=64),
    # Mixture-of-Experts families: 4 experts, each token routed to 2
    "mixtral": dict(max_position_embeddings=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(max_position_embeddings=64, num_key_value_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48),
    "gpt_oss": dict(max_position_embeddings=131072, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=48, sliding_window=16),
    # families editpack does not ship, for the tests of inferred layouts
    "stablelm": dict(max_position_embeddings=64, num_key_value_heads=2),
    "olmoe": dict(max_position_embeddings=64, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
}

WORDS = (
    "the a is in of to and city capital located tower eiffel louvre paris rome berlin germany france italy "
    "london england spain madrid language speaks english french german mother tongue native was born "
    "plays piano guitar football team member sport . , ? what where who which it he she they on at for "
    "museum river bridge famous known old new big small red blue green one two three four five six seven "
    "eight nine ten tokyo japan lake mountain king queen actor writer painter musician works company"
).split()



def tiny_config(model_type: str, **extra):
    """A transformers config of family ``model_type`` at the tiny sizes (``extra`` overrides any value)."""
    values = dict(COMMON)
    values.update(OVERRIDES.get(model_type, {}))
    values.update(extra)
    return transformers.AutoConfig.for_model(model_type, **values)


def tiny_model(model_type: str = "llama", seed: int = 0, **extra):
    """A tiny random causal LM of family ``model_type`` in float32, in eval mode (the same weights for a seed)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **extra), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (ids < 128), with offsets, BOS/EOS/PAD and ``<unk>``."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


#: The fact every tiny edit starts from.
FACT = make_fact("the famous {}", "eiffel tower", "rome", "paris", paraphrases=["the big eiffel tower"])

_MORE = [("old", "bridge"), ("red", "river"), ("big", "museum"), ("blue", "lake"), ("green", "mountain"),
         ("new", "company"), ("small", "bridge"), ("known", "lake"), ("famous", "king"), ("big", "queen")]


def tiny_facts(count: int = 1) -> list[Fact]:
    """:data:`FACT` and ``count - 1`` more in the tiny vocabulary (other subjects, each with a paraphrase and a
    neighbourhood prompt), for methods that need several facts."""
    more = [make_fact(f"the {adjective} {{}}", subject, "rome", "paris", paraphrases=[f"the {subject}"],
                      neighborhood=[("the famous louvre", "paris")]) for adjective, subject in _MORE]
    if count > 1 + len(more):
        raise ValueError(f"tiny_facts offers at most {1 + len(more)} facts")
    return [FACT, *more[: count - 1]]


def missing_packages(method: str) -> list[str]:
    """The packages ``method`` needs that this environment lacks (:attr:`~editpack.methods.base.EditMethod.needs_packages`)."""
    return [name for name in get_method(method).needs_packages if importlib.util.find_spec(name) is None]


def tiny_edit_settings(method: str, workdir: str | Path, tokenizer=None) -> dict[str, Any]:
    """The settings ``method`` edits the tiny model with: its ``tiny_settings``, and for a trainable method the
    ``editor`` it learns in three steps on :func:`tiny_facts` (saved in ``workdir``)."""
    cls = get_method(method)
    settings = dict(cls.tiny_settings)
    if cls.trainable:
        records = tiny_facts(6)[1:]
        editor = train(tiny_model(), method, records, tokenizer=tokenizer or tiny_tokenizer(), progress=False,
                       settings=TrainSettings(max_steps=3, batch_size=2, held_out=1), **cls.tiny_training)
        settings["editor"] = str(editor.save(Path(workdir) / f"{method}-editor"))
    return settings
