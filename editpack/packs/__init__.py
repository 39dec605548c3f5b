"""The packs wing: every kind of artifact editpack writes, each with what runs it.

- :mod:`.manifest` (``editpack.json``: names, versions, shape checks, file digests), :mod:`.base_model` (the model
  an artifact was made on) and :mod:`.artifact` (the base class: identity, lineage, atomic save, verified load,
  the registry of kinds) are what every kind shares; :mod:`.card` and :mod:`.chart` render its card;
- the kinds: :mod:`.weights` (a weight delta as a PEFT LoRA adapter; :mod:`.delta` holds the factors),
  :mod:`.memory` (SERAC/IKE memories and the model that consults them), :mod:`.codebook` (GRACE's codebook and
  its layer hook), :mod:`.side_memory` (WISE's routed side memory), :mod:`.editor` (a trained MEND editor) and
  :mod:`.statistics` (key statistics, and the local cache of them).

Importing this package registers every kind, so :func:`~editpack.packs.artifact.load_pack` reads any of them.
"""

from . import codebook, editor, memory, side_memory, statistics, weights  # noqa: F401  (each registers its kind)
