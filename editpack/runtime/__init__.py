"""The runtime wing: packs put on models and taken off again.

- :mod:`.apply`: :func:`~editpack.runtime.apply.apply`, :func:`~editpack.runtime.apply.revert`,
  :func:`~editpack.runtime.apply.remove` and :func:`~editpack.runtime.apply.set_enabled`, with the record of
  what is applied kept on the model itself;
- :mod:`.combine`: the rules every combination of packs follows (no pack twice, conflicts, parents, one base)
  and :func:`~editpack.runtime.combine.stack`;
- :mod:`.checks`: whether a pack was made for this model (fingerprints);
- :mod:`.lora`: a weight pack as a PEFT LoRA adapter on a model (offloaded layers included);
- :mod:`.pipelines`: a transformers text-generation pipeline over an edited model, and before/after comparisons.
"""
