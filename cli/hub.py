"""The Hub: ``editpack push``, ``pull`` and ``versions``."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from editpack.share.hub import pull, push, versions

from .common import friendly_errors, load_packs


@click.command("push")
@click.argument("pack")
@click.argument("repo_id")
@click.option("--private", is_flag=True, default=False,
              help="Create the repository as private (if it does not exist yet).")
@click.option("--message", default=None, help="Commit message (default: pack name and version).")
@friendly_errors
def push_cmd(pack, repo_id, private, message):
    """Upload PACK to the Hub model repository REPO_ID (user/name) as one commit tagged v<version>."""
    result = push(pack, repo_id, private=private, message=message)
    if result.created:
        click.echo(f"pushed {load_packs([pack])[0].name} {result.version} to {result.repo_id} "
                   f"(tag {result.tag}, commit {result.commit[:12]})")
    else:
        click.echo(f"{result.repo_id} already has {result.tag} with this content (commit {result.commit[:12]}); "
                   "nothing to do")


@click.command("pull")
@click.argument("reference")
@click.option("--output", "-o", default=None, type=click.Path(file_okay=False),
              help="Copy the verified pack here (default: use it in place in the Hugging Face cache).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing output directory.")
@friendly_errors
def pull_cmd(reference, output, overwrite):
    """Download REFERENCE (user/name[@1.2.0|@branch|@commit]) and verify every file against its manifest."""
    pack = pull(reference, output, overwrite=overwrite)
    click.echo(f"{pack.name} {pack.version}: {len(pack.facts)} fact(s), verified, at {pack.path}")


@click.command("versions")
@click.argument("repo_id")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@friendly_errors
def versions_cmd(repo_id, as_json):
    """List the versions of the pack in REPO_ID with their dates and commits."""

    found = versions(repo_id)
    if as_json:
        click.echo(json.dumps([asdict(v) for v in found], indent=2))
        return
    if not found:
        click.echo(f"{repo_id} has no versions yet")
    for v in found:
        click.echo(f"{v.version:<12} {v.tag:<13} {v.date or '-':<26} {v.commit}")


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [push_cmd, pull_cmd, versions_cmd]
