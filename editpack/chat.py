"""Chat form: prompts and facts as an instruct model's chat template presents them.

An instruct model deployed behind a chat template never sees "Who is the president of France?" bare: it sees the
template's system turn, the question as a user turn and the header of its own answer. An edit made on the bare
prompt need not reach that text, and an answer read from the bare prompt is not the one users get.
:func:`chat_prompt` renders one user turn with the tokenizer's own template (``apply_chat_template``, the
generation prompt added); :func:`chat_fact` does so for an edit request: its prompt (the subject's place kept),
paraphrases, neighbourhood and portability prompts. The answer follows the template's assistant header as a
continuation (a space before it, as every answer editpack optimises or scores).

Memory packs (``serac``, ``ike``) route plain prompts and rewrite them with their facts in context; they take no
chat form (:func:`check_plain_routing`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .errors import EditpackError
from .facts import Fact


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as the user's turn in ``tokenizer``'s chat template, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise EditpackError(f"chat form needs a chat template; the tokenizer of {_name(tokenizer)!r} has none "
                            "(leave out --chat: its prompts are plain text)")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def chat_prompts(tokenizer, texts: Sequence[str]) -> list[str]:
    """Each of ``texts`` in chat form (:func:`chat_prompt`)."""
    return [chat_prompt(tokenizer, t) for t in texts]


def chat_fact(tokenizer, fact: Fact) -> Fact:
    """``fact`` with every prompt in chat form (:func:`chat_prompt`); subject, answers and relation unchanged."""
    prompt = chat_prompt(tokenizer, fact.prompt)
    if prompt.count("{}") != 1:  # the template's own text has braces, or it dropped the user's turn
        raise EditpackError(f"the chat template of {_name(tokenizer)!r} writes {prompt.count('{}')} '{{}}' around "
                            f"the prompt {fact.prompt!r}; the subject's place must be the only one")
    probes = {name: tuple(dataclasses.replace(p, prompt=chat_prompt(tokenizer, p.prompt)) for p in getattr(fact, name))
              for name in ("neighborhood", "portability")}
    return dataclasses.replace(fact, prompt=prompt, paraphrases=tuple(chat_prompts(tokenizer, fact.paraphrases)),
                               **probes)


def chat_facts(tokenizer, facts: Sequence[Fact]) -> list[Fact]:
    """Each of ``facts`` in chat form (:func:`chat_fact`)."""
    return [chat_fact(tokenizer, f) for f in facts]


def check_plain_routing(packs: Sequence) -> None:
    """Refuse chat form for packs that route prompts by their plain text (``routes_text``: memory packs)."""
    for pack in packs:
        if getattr(pack, "routes_text", False):
            raise EditpackError(f"{pack.name} {pack.version} is a {pack.kind} pack: it routes plain prompts and puts "
                                "its facts in context around them, so it takes no chat form (leave out --chat)")
