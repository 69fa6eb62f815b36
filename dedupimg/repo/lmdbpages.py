"""Whether every page an LMDB file's trees point at lies inside the file: read before LMDB reads it.

LMDB maps its data file and trusts it: a page past the end of a file cut short faults (SIGBUS), and a zeroed
page read as a tree page trips one of its C assertions (an abort). Both kill the process instead of giving
an error. When the file is shorter than the pages its meta page counts (which a healthy file may also be: a
large transaction's freed-again pages are never written), repo/index.py walks the trees here first, with
plain reads: every branch page's children and every leaf's overflow pages must lie inside the file, and every
page must name itself (a page of zeros does not). Layout of LMDB 0.9 on a 64-bit little-endian machine
(mdb.c: MDB_page, MDB_node, MDB_db); the index never uses duplicate keys (no sub-pages).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

PAGE_HEADER = 16  # mp_pgno (8), mp_pad (2), mp_flags (2), mp_lower and mp_upper (2 + 2)
NODE_HEADER = 8  # mn_lo, mn_hi, mn_flags, mn_ksize (2 each)
P_BRANCH, P_LEAF = 0x01, 0x02
F_BIGDATA, F_SUBDATA = 0x01, 0x02
DB_ROOT = 40  # md_root inside an MDB_db record (a named database's node in the main database)
NO_PAGE = (1 << 64) - 1


def _u16(page: bytes, at: int) -> int:
    return int.from_bytes(page[at : at + 2], "little")


def _u64(page: bytes, at: int) -> int:
    return int.from_bytes(page[at : at + 8], "little")


def problem(fd: int, psize: int, roots: Iterable[tuple[str, int]]) -> str | None:
    """The first page of the trees under ``roots`` ((name, root page)) that lies past the end of the file
    open at ``fd``, or does not hold what its tree expects, in words; None when every page is in place."""
    pages = os.fstat(fd).st_size // psize
    stack = [(name, root, True) for name, root in roots]
    seen: set[int] = set()
    while stack:
        name, pgno, main = stack.pop()
        if pgno == NO_PAGE or pgno in seen:
            continue
        if pgno >= pages:
            return f"page {pgno} of {name} lies past the end of the file ({pages} pages)"
        seen.add(pgno)
        page = os.pread(fd, psize, pgno * psize)
        flags = _u16(page, 10)
        if len(page) < psize or _u64(page, 0) != pgno or not flags & (P_BRANCH | P_LEAF):
            return f"page {pgno} of {name} is not a tree page"
        lower, upper = _u16(page, 12), _u16(page, 14)
        if not PAGE_HEADER <= lower <= upper <= psize:
            return f"page {pgno} of {name} is damaged"
        for i in range((lower - PAGE_HEADER) // 2):
            node = _u16(page, PAGE_HEADER + 2 * i)
            if not upper <= node <= psize - NODE_HEADER:
                return f"page {pgno} of {name} is damaged"
            lo, hi, nflags, ksize = (_u16(page, node + k) for k in (0, 2, 4, 6))
            if flags & P_BRANCH:
                stack.append((name, lo | hi << 16 | nflags << 32, main))
                continue
            data = node + NODE_HEADER + ksize
            if nflags & F_BIGDATA:  # the value is on overflow pages: their first page's number is the data
                size = lo | hi << 16
                first = _u64(page, data)
                if first + (PAGE_HEADER - 1 + size) // psize + 1 > pages:
                    return f"overflow pages of {name} from {first} lie past the end of the file ({pages} pages)"
            elif nflags & F_SUBDATA and main:  # a named database: its tree hangs here
                key = bytes(page[node + NODE_HEADER : data]).decode(errors="replace")
                stack.append((f"database {key!r}", _u64(page, data + DB_ROOT), False))
    return None
