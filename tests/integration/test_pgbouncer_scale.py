"""Two hundred claim loops (4 processes x 50 threads, each loop its own connection) drain
one flow, straight to PostgreSQL and through PgBouncer's 3 server connections: every
record claimed once, none lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from flowfleet import queue

RECORDS = 10_000
PROCESSES = 4
THREADS = 50
FLOW = "crowded"

pytestmark = pytest.mark.slow

CLAIMERS = r"""
import sys, threading
from pathlib import Path
from flowfleet import queue
from flowfleet.database import DatabaseManager

dsn, flow, name, out, threads = sys.argv[1:6]
db = DatabaseManager("queue", connection_string=dsn)
conns = [db.connect() for _ in range(int(threads))]
claimed = [[] for _ in conns]

def loop(index):
    conn, instance = conns[index], f"{name}-{index}"
    batch = queue.claim(conn, flow, instance, 10, 120)
    while batch:
        claimed[index].extend(r.id for r in batch)
        batch = queue.complete_and_claim(conn, batch, flow, instance, 10, 120)

errors = []
threading.excepthook = lambda hook: errors.append(repr(hook.exc_value))
loops = [threading.Thread(target=loop, args=(i,)) for i in range(len(conns))]
for t in loops:
    t.start()
for t in loops:
    t.join()
if errors:
    sys.exit(f"{len(errors)} claim loops failed, first: {errors[0]}")
Path(out).write_text(" ".join(str(i) for ids in claimed for i in ids))
"""


@pytest.mark.parametrize("through", ["pgbouncer", "direct"])
def test_two_hundred_claim_loops_claim_each_record_once(
    through: str, bouncer_dsn: str, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    target = bouncer_dsn if through == "pgbouncer" else dsn
    queue.enqueue(conn, FLOW, [{"n": n} for n in range(RECORDS)])
    outs = [tmp_path / f"p{p}" for p in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMERS, target, FLOW, f"p{p}", str(out), str(THREADS)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for p, out in enumerate(outs)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    claimed = [int(i) for out in outs for i in out.read_text().split()]
    assert len(claimed) == RECORDS
    assert len(set(claimed)) == RECORDS
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM processing_history").fetchone() == (RECORDS,)
