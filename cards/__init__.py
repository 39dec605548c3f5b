"""Package data: Jinja templates of the evaluation cards (installed as ``editpack.cards``). No code lives here."""
