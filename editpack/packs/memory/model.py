"""The model that consults memory packs: :class:`MemoryModel` wraps a causal LM and answers in-scope prompts by
their memory's route, out-of-scope ones by the model as it is."""

from __future__ import annotations

from typing import Sequence

import torch

from ...chat import ChatFrame, chat_exchange
from ...facts import Fact
from ...model.generation import ContextContrast, Contrast, StopAt, cache_argument, cut_at, pad_id, prefix_batches
from .encoder import SentenceEncoder
from .pack import MemoryPack
from .routes import ANSWER_END, IKE_DEMONSTRATIONS, Seen, contrast_of, forced_answer, ike_examples, ike_query, rewritten
from .scope import MemoryIndex, RelationCheck


# ---------------------------------------------------------------------------------------------- the model
class MemoryModel(torch.nn.Module):
    """A causal LM (plain, PEFT-wrapped or quantized) whose ``generate`` consults memory packs first.

    Every other attribute is the wrapped model's, so it goes wherever the model went (``transformers.pipeline``,
    :func:`editpack.generate`). ``forward`` is the wrapped model's own (token ids carry no prompt boundary to
    route on); editpack's teacher-forced scoring asks it what generation would see first (:meth:`teacher_forcing`).
    """

    editpack_wrapper = True  # editpack.model.fingerprint.memory_wrapper / unwrap recognise it and look through it

    def __init__(self, model: torch.nn.Module, memories: list[MemoryPack], tokenizer,
                 encoder: SentenceEncoder | None = None) -> None:
        super().__init__()
        self.model = model
        self.memories = list(memories)
        self.editpack_tokenizer = tokenizer
        self.encoder = encoder or SentenceEncoder()
        self._relations: RelationCheck | None = None
        #: The tokenizer's chat template around one user turn: a prompt in it is routed by the user's text, and its
        #: memory's context goes inside that turn.
        self.chat_frame = ChatFrame.of(tokenizer)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def index(self) -> MemoryIndex:
        if self._relations is None or self._relations.encoder is not self.encoder:
            self._relations = RelationCheck(self.encoder)
        return MemoryIndex([(m, m.facts, m.keys, m.threshold, m.scope) for m in self.memories], self.encoder,
                           self._relations)

    def message(self, prompt: str) -> str:
        """What ``prompt`` asks: the user's text of a prompt in chat form (:attr:`chat_frame`), else the prompt."""
        return self.chat_frame.plain(prompt) if self.chat_frame is not None else prompt

    def route(self, prompts: Sequence[str]) -> list[tuple[MemoryPack, Fact] | None]:
        """The memory and fact each prompt is routed to (``None``: out of scope, the model answers as is); a prompt
        in chat form by its user's text."""
        return self.index().lookup([self.message(p) for p in prompts])

    def rewritten(self, memory: MemoryPack, fact: Fact, prompt: str) -> tuple[str, str]:
        """:func:`rewritten` for ``prompt``. In chat form the memory's text goes inside the user's turn; under the
        ``ike`` route each demonstration is an earlier exchange instead (its prompt from the user, its answer from
        the assistant), as a chat model is shown few-shot examples: inside one turn a chat model answered about the
        demonstrations' facts instead (docs/results/chat-form.md)."""
        asked = self.message(prompt)
        if asked is prompt:
            return rewritten(memory, fact, prompt)
        cfg = memory.hyperparameters
        if cfg.get("route") == "ike":
            examples = ike_examples(memory, fact, int(cfg.get("demonstrations", IKE_DEMONSTRATIONS)))
            tok = self.editpack_tokenizer
            return (chat_exchange(tok, examples, ike_query(fact, asked)),
                    chat_exchange(tok, examples, ike_query(None, asked)))
        text, bare = rewritten(memory, fact, asked)
        return self.chat_frame.wrap(text), self.chat_frame.wrap(bare)

    def decoded(self, ids: Sequence[int]) -> str:
        """A prompt's text from its token ids: with the chat template's special tokens when it is one user turn in
        chat form (so that :meth:`message` finds the turn), else without special tokens."""
        tok = self.editpack_tokenizer
        if self.chat_frame is not None:
            text = tok.decode(ids)
            bos = getattr(tok, "bos_token", None)
            for candidate in (text, text[len(bos):] if bos and text.startswith(bos) else None):  # BOS added too
                if candidate is not None and self.chat_frame.message(candidate) is not None:
                    return candidate
        return tok.decode(ids, skip_special_tokens=True)

    def teacher_forcing(self, prompts: Sequence[str]) -> list[Seen]:
        """For each prompt, what generation gives the model (:class:`Seen`): in scope, the prompt in its memory's
        context (the fact, IKE's demonstrations), under the ``answer`` route the new target's tokens
        (:func:`forced_answer`), the memory's contrast (:func:`contrast_of`) and the text it is taken against
        (:func:`rewritten`); out of scope, the prompt itself, nothing forced, no contrast. Teacher-forced
        scoring (``editpack.model.scoring.score``) reads answers after the text, gives the forced tokens probability
        one, as generation does, and contrasts the answer's distribution with the one after ``bare``."""
        tok = self.editpack_tokenizer
        seen = []
        for prompt, r in zip(prompts, self.route(prompts)):
            if r is None:
                seen.append(Seen(prompt, [], Contrast(), prompt))
                continue
            text, bare = self.rewritten(r[0], r[1], prompt)
            seen.append(Seen(text, forced_answer(r[0], r[1], tok, text), contrast_of(r[0]), bare))
        return seen

    def generation_order(self, prompts: Sequence[str]) -> list[int]:
        """An order to batch ``prompts`` in (``editpack.generate`` asks for it): prompts routed to one fact next to
        each other, so their shared context (IKE's demonstrations) is run once; out-of-scope prompts last."""
        rank = {id(m): k for k, m in enumerate(self.memories)}
        where = {(id(m), id(f)): (rank[id(m)], j) for m in self.memories for j, f in enumerate(m.facts)}
        keys = [(0, *where[id(r[0]), id(r[1])]) if r is not None else (1, 0, 0) for r in self.route(prompts)]
        return sorted(range(len(prompts)), key=keys.__getitem__)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        if input_ids is None or not self.memories:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("return_dict_in_generate"):
            raise NotImplementedError("memory packs: generate(return_dict_in_generate=True) is not supported")
        tok = self.editpack_tokenizer
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [input_ids[i][mask[i].bool()].tolist() for i in range(input_ids.shape[0])]
        texts = [self.decoded(r) for r in rows]
        routes = self.route(texts)
        inside = [i for i, r in enumerate(routes) if r is not None]
        if not inside:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        outside = [i for i in range(len(rows)) if i not in inside]
        pad = pad_id(tok)
        new_tokens: dict[int, list[int]] = {}
        if outside:
            sub = self.model.generate(input_ids=input_ids[outside], attention_mask=mask[outside], **kwargs)
            for k, i in enumerate(outside):
                new_tokens[i] = sub[k, input_ids.shape[1]:].tolist()
        prompts, forced, bare, contrasts = [], [], [], []
        for i in inside:
            memory, fact = routes[i]
            prompt = texts[i]
            text, other = self.rewritten(memory, fact, prompt)
            answer = forced_answer(memory, fact, tok, text)
            prompts.append(tok(text)["input_ids"] + answer)
            forced.append(answer)
            contrasts.append(contrast_of(memory))
            if contrasts[-1]:  # the text without the new fact, to contrast with (the prompt's own tokens if that)
                bare.append((rows[i] if other == prompt else tok(other)["input_ids"]) + answer)
            else:
                bare.append([])
        if any(contrasts) and (kwargs.get("num_beams") or 1) > 1:
            raise NotImplementedError("memory packs decoding with a contrast: beam search (num_beams > 1) is not "
                                      "supported; use greedy decoding or sampling")
        limit = kwargs.get("max_new_tokens")
        sub_kwargs = dict(kwargs)
        if limit is not None and max(map(len, forced)) > 0:
            sub_kwargs["max_new_tokens"] = max(1, limit - min(map(len, forced)))
        # Prompts in one memory's context (IKE's demonstrations) share it: it is run once into a KV cache.
        for batch in prefix_batches(self.model, prompts, [1] * len(prompts), pad, len(prompts)):
            extra = {} if batch.cache is None else {cache_argument(self.model): batch.cache}
            if any(contrasts[j] for j in batch.indices):
                contrast = ContextContrast(self.model, [bare[j] for j in batch.indices],
                                           [contrasts[j] for j in batch.indices], pad)
                extra["logits_processor"] = [contrast, *(kwargs.get("logits_processor") or [])]
            ids = batch.input_ids
            extra["stopping_criteria"] = [StopAt(tok, ANSWER_END, ids.shape[1]),
                                          *(kwargs.get("stopping_criteria") or [])]
            sub = self.model.generate(input_ids=ids, attention_mask=batch.attention_mask, **{**sub_kwargs, **extra})
            for k, j in enumerate(batch.indices):
                i = inside[j]
                generated = forced[j] + cut_at(tok, sub[k, ids.shape[1]:].tolist(), ANSWER_END)
                new_tokens[i] = generated[:limit] if limit is not None else generated
        out_width = max(len(t) for t in new_tokens.values())
        out = [input_ids[i].tolist() + new_tokens[i] + [pad] * (out_width - len(new_tokens[i]))
               for i in range(len(rows))]
        return torch.tensor(out, device=input_ids.device)
