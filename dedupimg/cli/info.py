"""`dedupimg info`: the repository's size, deduplication and compression (holes and zero runs apart)."""

from __future__ import annotations

import typer

from dedupimg.cli.app import JsonOption, RepoOption, open_repo
from dedupimg.cli.render import JSON_VERSION, exit_codes_help, human_bytes, plural, print_json, stdout
from dedupimg.ops.stats import repository_totals


def info(
    ctx: typer.Context,
    json: JsonOption = False,
    repo_dir: RepoOption = None,
) -> None:
    """Repository size, deduplication and compression; holes and zero runs count apart (never stored).

    'dedupimg stats' shows what each snapshot costs."""
    with open_repo(ctx) as repo:
        report = repository_totals(repo)
        config = repo.config
        location = repo.location
    t, whole = report.totals, report.repository
    doc = {
        "version": JSON_VERSION,
        "repo_id": config.repo_id,
        "path": location,
        "snapshots": t.snapshots,
        "logical_bytes": t.size,
        "allocated_bytes": t.allocated,  # logical bytes held in chunks
        "zero_bytes": t.zeros,  # holes and zero runs: recorded as lengths, never stored
        "unique_bytes": t.data,  # raw bytes of the distinct chunks the snapshots need
        "stored_bytes": whole.pack_bytes,
        "packs": whole.packs,
        "chunks": t.chunks,
        "dedup_ratio": round(t.dedup_ratio, 3),  # allocated / unique: zeros are not deduplication
        "compression_ratio": round(t.compression_ratio, 3),
        "chunk_size": config.chunker.avg_size,
    }
    if json:
        print_json(doc)
        return
    stdout.print(f"repository   {config.repo_id} at {location}", markup=False)
    stdout.print(f"snapshots    {t.snapshots}")
    stdout.print(f"logical      {human_bytes(t.size)} = {human_bytes(t.allocated)} data + {human_bytes(t.zeros)} "
                 "holes and zero runs")
    stdout.print(f"unique data  {human_bytes(t.data)} in {plural(t.chunks, 'chunk')}")
    stdout.print(f"stored       {human_bytes(whole.pack_bytes)} in {plural(whole.packs, 'pack')}")
    stdout.print(f"dedup ratio  {t.dedup_ratio:.2f}x   compression ratio {t.compression_ratio:.2f}x")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help())(info)
