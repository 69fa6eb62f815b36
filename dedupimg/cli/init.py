"""`dedupimg init`: create a repository."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import FromPasswordFile, RepoOption, repo_location, use_from_password_file
from dedupimg.cli.render import exit_codes_help, stderr, stdout
from dedupimg.core.config import DEFAULT_CHUNK_SIZE, NEW_SEGMENTS, ChunkerParams
from dedupimg.core.crypto import default_aead
from dedupimg.core.errors import UsageError
from dedupimg.ops.copy import repository_config
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
    encryption: Annotated[
        str, typer.Option(metavar="AEAD", envvar="DEDUPIMG_ENCRYPTION",
                          help="auto (AES-256-GCM where the CPU has AES instructions, else ChaCha20-Poly1305), "
                               "aes-256-gcm, chacha20-poly1305, or none (an unencrypted repository, on purpose); "
                               "or $DEDUPIMG_ENCRYPTION.")
    ] = "auto",
    padding: Annotated[
        int | None, typer.Option(hidden=True, help="Encrypted blobs' spans are multiples of this (measurements).")
    ] = None,
    copy_chunker_params_from: Annotated[
        str | None,
        typer.Option(metavar="REPOSITORY", help="Cut chunks as this repository does (its chunker parameters), so "
                                                "that 'copy' between the two deduplicates fully."),
    ] = None,
    from_password_file: FromPasswordFile = None,
    repo_dir: RepoOption = None,
) -> None:
    """Create a new repository (readable by its owner only), encrypted unless --encryption none."""
    chunker = ChunkerParams.for_average(chunk_size)
    if copy_chunker_params_from is not None:
        given = ctx.get_parameter_source("chunk_size")
        if given is not None and given.name != "DEFAULT":
            raise UsageError("give either --chunk-size or --copy-chunker-params-from, not both")
        use_from_password_file(from_password_file)
        source, source_keys = repository_config(copy_chunker_params_from)
        if source_keys is not None and encryption == "none":
            raise UsageError(f"{copy_chunker_params_from} is encrypted: its chunker parameters are secret and "
                             "cannot go into an unencrypted repository's config")
        chunker = source.chunker
        if source.segments != NEW_SEGMENTS:
            stderr.print(f"dedupimg: warning: {copy_chunker_params_from} cuts manifest segments with other "
                         "parameters; they are not copied (snapshots still copy whole)")
    else:
        source_keys = None
    aead = default_aead() if encryption == "auto" else encryption
    repo = Repository.init(repo_location(ctx), chunker, pack_size, compression_level, encryption=aead,
                           hashing_of=source_keys, copied_params=copy_chunker_params_from is not None,
                           padding=padding)
    repo.close()
    how = f"encrypted with {repo.config.encryption}" if repo.config.encrypted else "unencrypted"
    stdout.print(f"created repository {repo.config.repo_id[:8]} at {repo.location} ({how})", markup=False)


def register(app: typer.Typer) -> None:
    # 10, 12, 17: --copy-chunker-params-from names no repository, a damaged one, or one that cannot be read.
    app.command(epilog=exit_codes_help(10, 12, 16, 17, 18, 21, 22, opens_repository=False))(init)
