"""The guide's approach, as a baseline: a relay that inserts every POSTed row into SQLite.

.venv/bin/python bench/naive_relay.py PORT DB_PATH
"""

from __future__ import annotations

import argparse
import json
import sqlite3

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()
conn: sqlite3.Connection | None = None


@app.post("/relay/immediate")
async def immediate(request: Request) -> dict[str, str]:
    body = await request.json()
    assert conn is not None
    conn.execute(
        "INSERT INTO relay VALUES (?, ?, ?, ?)",
        (body["agent_id"], body["table"], json.dumps(body["data"]), body.get("timestamp")),
    )
    conn.commit()
    return {"status": "ok"}


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS relay (agent_id TEXT, tbl TEXT, data TEXT, ts REAL)")
    return db


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="HTTP port on 127.0.0.1")
    parser.add_argument("db_path", nargs="?", default=":memory:", help="SQLite file the rows go to")
    args = parser.parse_args()
    conn = _open(args.db_path)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
