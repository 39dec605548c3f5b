"""Package data: one JSON architecture spec per model family (installed as ``editpack.adapters``).

No code lives here. See ``editpack.arch`` for the schema and ``docs/concepts/architectures.md`` for how to add a family.
"""
