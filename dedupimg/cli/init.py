"""`dedupimg init`: create a repository."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import RepoOption, repo_location
from dedupimg.cli.render import exit_codes_help, stdout
from dedupimg.core.config import DEFAULT_CHUNK_SIZE, ChunkerParams
from dedupimg.repo.repository import Repository


def init(
    ctx: typer.Context,
    chunk_size: Annotated[
        int, typer.Option(help="Average chunk size in bytes (a power of two; min is 1/4, max 4x).")
    ] = DEFAULT_CHUNK_SIZE,
    compression_level: Annotated[
        int | None, typer.Option(help="zstd level for new chunks (-7 fastest .. 22 smallest).")
    ] = None,
    pack_size: Annotated[int | None, typer.Option(hidden=True, help="Target pack size (tests).")] = None,
    repo_dir: RepoOption = None,
) -> None:
    """Create a new repository (readable by its owner only)."""
    repo = Repository.init(repo_location(ctx), ChunkerParams.for_average(chunk_size), pack_size, compression_level)
    repo.close()
    stdout.print(f"created repository {repo.config.repo_id[:8]} at {repo.location}", markup=False)


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(16, 18, 21, opens_repository=False))(init)
