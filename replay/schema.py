"""The buffer's SQLite schema: SQLite is the source of truth, the FAISS index derives from it.

`records.row` is AUTOINCREMENT so an evicted row's id is never reused (a stale FAISS id can never
point at another ticket); `records.key` is a random hash that orders eviction and sampling;
`skipped` remembers curated-away ids, so a redelivered duplicate stays idempotent.
`records.messages` is a conversation as JSON (`TicketRecord.messages`), read back with `json`.
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY,
    opened_at REAL NOT NULL,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS records (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    label TEXT,
    reply TEXT,
    messages TEXT,
    window INTEGER NOT NULL REFERENCES windows(id),
    probe INTEGER NOT NULL,
    added_at REAL NOT NULL,
    embedding BLOB NOT NULL,
    key REAL NOT NULL DEFAULT 0,
    suspect INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_window ON records(window, probe);
CREATE TABLE IF NOT EXISTS skipped (
    id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    duplicate_of TEXT
);
"""

# Columns added since a buffer was first written: added to an older file when it is opened.
ADDED_COLUMNS = {"records": {"messages": "TEXT"}}
