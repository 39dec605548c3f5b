"""The evaluation wing: what an edit does, and what it does to everything else.

- :mod:`.protocols`: reliability, generalization, locality and portability under three named protocols
  (``teacher_forced_token_acc``, ``prob_compare``, ``generate_match``) and the per-record benchmark loop;
- :mod:`.side_effects`: the shipped suites (unrelated prompts, the subject's other relations, perplexity, fluency)
  measured before and after;
- :mod:`.report`: a pack's evaluation as its card and manifest record it, and ``verify --rerun``.
"""
