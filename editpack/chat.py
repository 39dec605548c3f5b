"""Chat form: prompts and facts as an instruct model's chat template presents them.

An instruct model deployed behind a chat template never sees "Who is the president of France?" bare: it sees the
template's system turn, the question as a user turn and the header of its own answer. An edit made on the bare
prompt need not reach that text, and an answer read from the bare prompt is not the one users get.
:func:`chat_prompt` renders one user turn with the tokenizer's own template (``apply_chat_template``, the
generation prompt added); :func:`chat_fact` does so for an edit request: its prompt (the subject's place kept),
paraphrases, neighbourhood and portability prompts. The answer follows the template's assistant header, which
ends in a line break, with no space before it (``editpack.model.generation.continuation``): what the model writes there.

Memory packs (``serac``, ``ike``) keep their facts plain: they route a chat-form prompt by its user turn and put
their facts in context inside it (:class:`ChatFrame`), so they are made without chat form
(:func:`check_plain_routing`) and answer chat prompts all the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from ._lazy import jinja2
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


def chat_exchange(tokenizer, examples: Sequence[tuple[str, str]], text: str) -> str:
    """``examples`` as earlier turns (each prompt from the user, its answer from the assistant), then ``text`` as the
    user's turn, in ``tokenizer``'s chat template, ending where the assistant's answer starts: few-shot examples as
    a chat model is shown them."""
    turns = [{"role": role, "content": content} for prompt, answer in examples
             for role, content in (("user", prompt), ("assistant", answer))]
    return tokenizer.apply_chat_template(turns + [{"role": "user", "content": text}], tokenize=False,
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


#: A user turn no one writes, rendered to find where a template puts the user's text.
_MARK = "\u2063editpack-user-turn\u2063"


@dataclass(frozen=True)
class ChatFrame:
    """What a tokenizer's chat template writes before and after one user turn's text (the generation prompt
    included). A text so framed is that turn in chat form: :meth:`message` finds the user's text in it, and
    :meth:`wrap` frames another text the same way."""

    before: str
    after: str

    @classmethod
    def of(cls, tokenizer) -> "ChatFrame | None":
        """The frame of ``tokenizer``'s template; ``None`` without a template or when it does not write the user's
        text once, verbatim."""

        if not getattr(tokenizer, "chat_template", None):
            return None
        try:
            text = chat_prompt(tokenizer, _MARK)
        except (jinja2.TemplateError, ValueError):  # a template that wants other turns: its prompts are routed as they are
            return None
        if text.count(_MARK) != 1:
            return None
        before, after = text.split(_MARK)
        return cls(before, after)

    def message(self, text: str) -> str | None:
        """The user's text when ``text`` is one user turn in this frame, else ``None``."""
        if len(text) < len(self.before) + len(self.after) or not text.startswith(self.before):
            return None
        return text[len(self.before) : len(text) - len(self.after)] if text.endswith(self.after) else None

    def wrap(self, message: str) -> str:
        return self.before + message + self.after

    def plain(self, text: str) -> str:
        """The user's text when ``text`` is one user turn in this frame, else ``text`` itself."""
        message = self.message(text)
        return text if message is None else message


def plain_fact(frame: "ChatFrame | None", fact: Fact) -> Fact:
    """``fact`` with each prompt that is one user turn in ``frame`` replaced by the user's text (the inverse of
    :func:`chat_fact`); other prompts, and every prompt without a frame, as they are."""
    if frame is None:
        return fact
    probes = {name: tuple(dataclasses.replace(p, prompt=frame.plain(p.prompt)) for p in getattr(fact, name))
              for name in ("neighborhood", "portability")}
    return dataclasses.replace(fact, prompt=frame.plain(fact.prompt),
                               paraphrases=tuple(map(frame.plain, fact.paraphrases)), **probes)


def facts_form(tokenizer, facts: Sequence[Fact]) -> str:
    """``"chat"`` when every one of ``facts`` is in ``tokenizer``'s chat form (its prompt one user turn of the
    template, as :func:`chat_fact` writes it), ``"plain"`` when none is (or there are none), else ``"mixed"`` (a
    stack of packs of both forms)."""
    frame = ChatFrame.of(tokenizer)
    framed = sum(frame.message(f.prompt) is not None for f in facts) if frame is not None else 0
    return "plain" if framed == 0 else "chat" if framed == len(facts) else "mixed"


def check_same_form(tokenizer, held: Sequence[Fact], chat: bool, what: str) -> None:
    """Refuse new facts in one form (``chat``) for ``what``, a pack whose ``held`` facts are in the other: a pack
    extended so would hold facts it was edited on in two forms (a stack that holds both already takes either)."""
    form = facts_form(tokenizer, held)
    if form != "mixed" and form != ("chat" if chat else "plain") and held:
        raise EditpackError(f"{what} holds its facts in {form} form; new facts take its form "
                            f"({'give' if form == 'chat' else 'leave out'} chat / --chat)")


def check_plain_routing(makers: Sequence) -> None:
    """Refuse chat-form facts for the methods (classes) and packs in ``makers`` that keep theirs plain
    (``routes_text``: memory packs, which answer a chat-form prompt by its user turn). One check for the library
    and for the commands, which call it before loading a model."""
    for maker in makers:
        if not getattr(maker, "routes_text", False):
            continue
        if isinstance(maker, type):  # a method
            what = (f"{maker.name} makes memory packs, which keep their facts plain and answer a chat-form prompt "
                    "by its user turn: they take no chat form")
        else:
            what = (f"{maker.name} {maker.version} is a {maker.kind} pack: it keeps its facts plain and answers a "
                    "chat-form prompt by its user turn, so its facts take no chat form")
        raise EditpackError(f"{what} (leave out chat / --chat; generate --chat answers in chat form)")
