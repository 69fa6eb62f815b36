"""`dedupimg repair index`: rebuild the index from the pack files (``repair`` is a group: more may follow)."""

from __future__ import annotations

import typer

from dedupimg.cli.app import JsonOption, LockWait, RepoOption, command_group, repo_location
from dedupimg.cli.render import JSON_VERSION, exit_codes_help, print_json, progress_sink, stdout
from dedupimg.ops.repair import RepairReport, repair_index

repair_app = command_group("Rebuild repository metadata from the pack files.")


@repair_app.command("index", epilog=exit_codes_help(10, 11, 12, 16, 18, opens_repository=False))
def index(
    ctx: typer.Context,
    json: JsonOption = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Rebuild the whole index (chunk locations, manifests, snapshot list, reference counts) from the packs.

    Use it when the index is missing or damaged. Damaged packs are reported, and their intact blobs salvaged
    (prune then rewrites them); snapshots whose data is still incomplete are left out and reported, and prune
    keeps what they have until 'forget --left-out'; forgotten snapshots stay forgotten. A pack that cannot be
    read (an I/O error) stops it, changing nothing.
    """
    report = repair_index(repo_location(ctx), lock_wait, progress_sink(item_tasks=("repair index",)))
    if json:
        print_json(_repair_json(report))
        return
    salvaged = {s.name: s for s in report.salvaged}
    for name, why in report.damaged_packs:
        if name not in salvaged:
            stdout.print(f"skipped damaged pack {name}: {why}", markup=False)
            continue
        s = salvaged[name]
        stdout.print(f"damaged pack {name}: {why}; salvaged {s.blobs} intact blobs ({s.deltas} delta chunks, "
                     f"whose base only the lost trailer names, and {s.damaged} damaged blobs not; "
                     f"{s.bytes_lost} bytes unused); the next prune copies them to a new pack and deletes it",
                     markup=False)
    for where in report.skipped:
        stdout.print(f"skipped {where}: a directory, not a pack; left alone", markup=False)
    for why in report.damaged_blobs:
        stdout.print(f"unreadable blob: {why}", markup=False)
    for rec in report.left_out:
        stdout.print(f"left out snapshot {rec.name}@{rec.id.hex()[:8]} ({rec.time}): it {rec.reason}", markup=False)
    if report.left_out:
        stdout.print("prune keeps what the snapshots left out still have; recover the missing data (a copy of the "
                     "damaged packs) and repair again to list them, or remove them with 'dedupimg forget "
                     "--left-out'", markup=False)
    stdout.print(f"rebuilt the index from {report.packs} packs ({len(report.damaged_packs)} damaged, "
                 f"{len(report.salvaged)} of them salvaged): "
                 f"{report.snapshots} snapshots, {report.segments} segments; {report.forgotten} forgotten "
                 f"snapshot records and {len(report.left_out)} incomplete ones left out; "
                 f"in {report.seconds:.1f} s", markup=False)


def _repair_json(report: RepairReport) -> dict[str, object]:
    return {
        "version": JSON_VERSION,
        "packs": report.packs,
        "damaged_packs": [{"pack": n, "reason": why} for n, why in report.damaged_packs],
        "salvaged": [{"pack": s.name, "blobs": s.blobs, "deltas": s.deltas, "damaged": s.damaged,
                      "bytes_lost": s.bytes_lost} for s in report.salvaged],
        "damaged_blobs": report.damaged_blobs,
        "skipped": report.skipped,
        "segments": report.segments,
        "snapshots": report.snapshots,
        "forgotten": report.forgotten,
        "left_out": [{"id": r.id.hex(), "name": r.name, "time": r.time, "reason": r.reason}
                     for r in report.left_out],
        "leftovers_removed": report.leftovers_removed,
        "seconds": round(report.seconds, 3),
    }


def register(app: typer.Typer) -> None:
    app.add_typer(repair_app, name="repair")
