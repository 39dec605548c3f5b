"""``editpack ui``: the local playground page."""

from __future__ import annotations

from pathlib import Path

import click

from editpack._lazy import fastapi, markdown_it, uvicorn
from editpack.model.loading import load_model
from editpack.paths import cache_dir
from editpack.ui import Playground
from editpack.ui.app import allowed_hosts, create_app

from .common import check_corpus, friendly_errors


@click.command("ui")
@click.option("--packs", "packs_dir", default=None, type=click.Path(file_okay=False),
              help="Folder of packs to offer; new edits are saved here (default: $EDITPACK_HOME/playground).")
@click.option("--model", default=None, help="Model to load (default: the default built-in).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (this machine only by default).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535))
@click.option("--no-eval", is_flag=True, default=False,
              help="Save new edits without evaluating them (faster, cards without scores).")
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH", help="Key-statistics corpus.")
@friendly_errors
def ui_cmd(packs_dir, model, host, port, no_eval, corpus):
    """A local web page: browse packs and their cards, switch them on and off, compare, and edit."""
    for needed in (uvicorn, fastapi, markdown_it):  # before the model loads: the playground's extra is there
        needed.load()

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: binding {host}: anyone who can reach it can run edits on this machine.", err=True)
    lm, tokenizer = load_model(model)
    folder = Path(packs_dir) if packs_dir else cache_dir("playground")
    playground = Playground(lm, tokenizer, folder, evaluate=not no_eval,
                            corpus=check_corpus(corpus) if corpus else None)
    click.echo(f"editpack playground on http://{host}:{port}/ ({lm.editpack_ref.id}; packs in {folder}); Ctrl+C stops")
    uvicorn.run(create_app(playground, hosts=allowed_hosts(host)), host=host, port=port, log_level="warning")


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [ui_cmd]
