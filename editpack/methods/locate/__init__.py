"""Machinery shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit, GRACE's values), in one place.

- where the subject sits in a prompt, right-padded batches and keys (:mod:`.keys`);
- context prefixes sampled from the model (:mod:`.context`, remembered on the model object);
- the value optimisation (:mod:`.values`): a vector δ added at the subject's last token to a module's
  output so that the model predicts the new target (NLL), keeps its distribution on "{subject} is a" (KL), with a
  norm penalty and clamp and early stopping;
- precision and gradient control while optimising, updates added and removed (:mod:`.model_state`);
- batches split at the edited position (:mod:`.split_batch`);
- what every such method resolves before editing: layers, statistics, prefixes (:mod:`.resolve`).
"""
