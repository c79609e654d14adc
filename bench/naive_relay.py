"""The guide's approach, as a baseline: a relay that inserts every POSTed row into SQLite.

.venv/bin/python bench/naive_relay.py PORT DB_PATH
"""

from __future__ import annotations

import json
import sqlite3
import sys

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()
conn = sqlite3.connect(sys.argv[2] if len(sys.argv) > 2 else ":memory:", check_same_thread=False)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("CREATE TABLE IF NOT EXISTS relay (agent_id TEXT, tbl TEXT, data TEXT, ts REAL)")


@app.post("/relay/immediate")
async def immediate(request: Request) -> dict[str, str]:
    body = await request.json()
    conn.execute(
        "INSERT INTO relay VALUES (?, ?, ?, ?)",
        (body["agent_id"], body["table"], json.dumps(body["data"]), body.get("timestamp")),
    )
    conn.commit()
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
