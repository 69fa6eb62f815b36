"""`dedupimg info`: the repository's size, deduplication and compression."""

from __future__ import annotations

import typer

from dedupimg.cli.app import JsonOption, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, stdout


def info(
    ctx: typer.Context,
    json: JsonOption = False,
    repo_dir: RepoOption = None,
) -> None:
    """Repository size, deduplication and compression."""
    with open_repo(ctx) as repo:
        stats = repo.stats()
        config = repo.config
        location = repo.location
    dedup = stats.logical_bytes / stats.unique_bytes if stats.unique_bytes else 0.0
    compression = stats.unique_bytes / stats.chunk_stored_bytes if stats.chunk_stored_bytes else 0.0
    doc = {
        "repo_id": config.repo_id,
        "path": location,
        "snapshots": stats.snapshots,
        "logical_bytes": stats.logical_bytes,
        "unique_bytes": stats.unique_bytes,
        "stored_bytes": stats.pack_bytes,
        "packs": stats.packs,
        "chunks": stats.chunks,
        "dedup_ratio": round(dedup, 3),
        "compression_ratio": round(compression, 3),
        "chunk_size": config.chunker.avg_size,
    }
    if json:
        print_json(doc)
        return
    stdout.print(f"repository   {config.repo_id} at {doc['path']}")
    stdout.print(f"snapshots    {stats.snapshots}")
    stdout.print(f"logical      {human_bytes(stats.logical_bytes)}")
    stdout.print(f"unique data  {human_bytes(stats.unique_bytes)} in {stats.chunks} chunks")
    stdout.print(f"stored       {human_bytes(stats.pack_bytes)} in {stats.packs} packs")
    stdout.print(f"dedup ratio  {dedup:.2f}x   compression ratio {compression:.2f}x")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help())(info)
