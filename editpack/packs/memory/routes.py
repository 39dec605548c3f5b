"""What an in-scope prompt becomes under its memory's route (``context``, ``answer``, ``ike``): the text the model
reads, the answer tokens the route forces, the contrast it decodes with and the text that contrast is taken
against."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from ...facts import Fact, fact_key
from ...model.generation import Contrast
from ...model.scoring import answer_ids
from .pack import MemoryPack

ROUTES = ("context", "answer", "ike")


DEMO_TEMPLATE = ("New fact: The capital of Japan is Lisbon.\nQuestion: The capital of Japan is\nAnswer: Lisbon\n\n"
                 "New fact: {statement}.\nQuestion: {prompt}\nAnswer:")


#: Where an in-scope answer ends: every route's text separates its examples by a blank line, so what a model writes
#: after one is the next example (another stored fact, a demonstration), never the answer.
ANSWER_END = "\n\n"


# ---------------------------------------------------------------------------------------------- IKE
#: Stored facts whose copy, update and retain examples precede an IKE prompt (chosen by measurement:
#: docs/results/memory-packs.md).
IKE_DEMONSTRATIONS = 8


#: Used when a pack holds too few facts of its own to demonstrate with: one update and one retain example, each
#: (prompt, answer).
IKE_FALLBACK = (
    ("New Fact: The capital of Japan is Lisbon\nPrompt: The capital city of Japan is", "Lisbon"),
    ("New Fact: The capital of Japan is Lisbon\nPrompt: The capital of France is", "Paris"),
)


def ike_examples(memory: MemoryPack, fact: Fact, k: int) -> list[tuple[str, str]]:
    """IKE's in-context demonstrations from the ``k`` stored facts nearest to ``fact`` (MiniLM keys), the nearest
    last, each a (prompt, answer) pair: for each fact a copy example (its prompt answered with its new target), an
    update example (a paraphrase answered with it) and a retain example (a neighbourhood prompt answered as
    before); generic ones fill a pack too small."""
    index = next(i for i, f in enumerate(memory.facts) if f is fact or fact_key(f) == fact_key(fact))
    order = (memory.keys @ memory.keys[index]).argsort(descending=True).tolist()
    examples: list[tuple[str, str]] = []
    for j in reversed([j for j in order if j != index][:k]):  # the nearest fact last, next to the prompt
        other = memory.facts[j]
        examples.append((ike_query(other, other.text), other.target_new))
        if other.paraphrases:
            examples.append((ike_query(other, other.paraphrases[0]), other.target_new))
        if other.neighborhood:
            examples.append((ike_query(other, other.neighborhood[0].prompt), other.neighborhood[0].answer))
    return examples if examples else list(IKE_FALLBACK)


def ike_query(fact: Fact | None, prompt: str) -> str:
    """An IKE example's or prompt's text before its answer: the new fact (``None``: left out, what a contrast is
    taken against), then the prompt."""
    return f"New Fact: {fact.text} {fact.target_new}\nPrompt: {prompt}" if fact is not None else f"Prompt: {prompt}"


def ike_demonstrations(memory: MemoryPack, fact: Fact, k: int) -> list[str]:
    """:func:`ike_examples` as text, each prompt followed by its answer."""
    return [f"{query} {answer}" for query, answer in ike_examples(memory, fact, k)]



def ike_text(demos: Sequence[str], fact: Fact | None, prompt: str) -> str:
    """Demonstrations, then the new fact (``None``: left out, what a contrast is taken against) and the prompt."""
    return ANSWER_END.join([*demos, ike_query(fact, prompt)])  # examples apart by the blank line an answer ends at


def forced_answer(memory: MemoryPack, fact: Fact, tokenizer, after: str = "") -> list[int]:
    """The tokens an in-scope answer starts with after the text ``after``: the fact's new target under the
    ``answer`` route, else none (tokenized as teacher-forced scoring tokenizes answers, so the two line up token
    for token)."""
    if memory.hyperparameters.get("route") != "answer":
        return []
    return answer_ids(tokenizer, fact.target_new, after)


def contrast_of(memory: MemoryPack) -> Contrast:
    """The context-aware decoding its in-scope prompts are answered with (``contrast`` and ``plausibility``; packs
    made before the settings existed read no contrast: the in-context distribution as it is)."""
    cfg = memory.hyperparameters
    return Contrast(float(cfg.get("contrast", 0.0)), float(cfg.get("plausibility", 0.0)))


def rewritten(memory: MemoryPack, fact: Fact, prompt: str) -> tuple[str, str]:
    """An in-scope prompt rewritten by its memory's route (IKE's demonstrations, or the template with the fact),
    and what its contrast is taken against: the same text without the new fact. Under the ``ike`` route that is
    the demonstrations and the prompt, so what the demonstrations alone prime (another fact's answer, a retain
    example's) weighs the same on both sides and the contrast is the new fact's own; otherwise the prompt. The
    demonstrations are chosen once for both."""
    cfg = memory.hyperparameters
    if cfg.get("route") == "ike":
        demos = ike_demonstrations(memory, fact, int(cfg.get("demonstrations", IKE_DEMONSTRATIONS)))
        return ike_text(demos, fact, prompt), ike_text(demos, None, prompt)
    statement = f"{fact.text} {fact.target_new}"
    return cfg.get("template", DEMO_TEMPLATE).format(statement=statement, prompt=prompt), prompt




class Seen(NamedTuple):
    """What generation gives the model for one prompt (:meth:`MemoryModel.teacher_forcing`)."""

    text: str  # the prompt as the model sees it: in its memory's context when in scope
    forced: list[int]  # answer tokens the route forces (the ``answer`` route's target), else none
    contrast: Contrast  # the context-aware decoding it is answered with (none out of scope)
    bare: str  # what the contrast is taken against (:func:`rewritten`); the prompt out of scope
