"""The share wing: packs between people and over time.

- :mod:`.hub`: push, pull and list versions on the Hugging Face Hub (tags ``v<version>``, verified pulls);
- :mod:`.history`: a pack's versions (:func:`~editpack.share.history.log`) and what changed between two of them
  (:func:`~editpack.share.history.diff`);
- :mod:`.describe`: what ``editpack show`` says of a pack, and whether it verifies.
"""
