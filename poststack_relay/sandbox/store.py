# -*- test-case-name: tests.test_sandbox -*-
"""
SQLite storage for the sandbox API: every email it accepts, in one table.

The store is synchronous (stdlib ``sqlite3`` in autocommit mode): the sandbox
is a small local test double and each call is a single short statement, so
blocking the reactor for it is acceptable. Rows are committed as soon as they
are written, so another process (a test, a human with ``sqlite3``) can read
the file while the sandbox runs.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import attrs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS emails (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    api_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key TEXT,
    fingerprint TEXT NOT NULL,
    request_headers TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS emails_idempotency
    ON emails (api_key, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""

_COLUMNS = "id, api_key, payload, idempotency_key, request_headers, created_at"


@attrs.frozen
class StoredEmail:
    """
    One email the sandbox accepted with ``POST /emails``.

    @ivar id: The email id handed back to the client (``em_...``).
    @ivar api_key: The API key that sent it (the full key: this is a sandbox).
    @ivar payload: The JSON request body exactly as received.
    @ivar idempotency_key: The effective idempotency key (the body's
        ``idempotency_key`` if present, else the ``Idempotency-Key`` header),
        or L{None}.
    @ivar request_headers: The HTTP request headers, names lower-cased,
        repeated headers joined with C{", "}; C{authorization} is never stored.
    @ivar created_at: ISO 8601 UTC timestamp, e.g. C{2025-01-31T12:00:00.000Z}.
    """

    id: str
    api_key: str
    payload: dict[str, Any]
    idempotency_key: str | None
    request_headers: dict[str, str]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        """
        Return this email as a JSON-serialisable dict (the shape used by
        C{GET /_sandbox/emails}).
        """
        return {
            "id": self.id,
            "api_key": self.api_key,
            "payload": self.payload,
            "idempotency_key": self.idempotency_key,
            "request_headers": self.request_headers,
            "created_at": self.created_at,
        }


def _row_to_email(row: tuple[Any, ...]) -> StoredEmail:
    email_id, api_key, payload, idempotency_key, headers, created_at = row
    return StoredEmail(
        id=email_id,
        api_key=api_key,
        payload=json.loads(payload),
        idempotency_key=idempotency_key,
        request_headers=json.loads(headers),
        created_at=created_at,
    )


class SandboxStore:
    """
    The sandbox's SQLite file of accepted emails.

    The file and its table are created if missing; an existing file keeps its
    rows (and so its idempotency keys) across restarts.
    """

    def __init__(self, path: str) -> None:
        """
        Open (creating if needed) the SQLite database at C{path}.

        @raise sqlite3.Error: If the file cannot be opened or is not a
            database.
        """
        self.path = path
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, isolation_level=None
        )
        self._db.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SandboxStore is closed")
        return self._db

    def add(self, email: StoredEmail, fingerprint: str) -> None:
        """
        Store one accepted email.

        @param fingerprint: A digest of the canonical request body, compared
            when the same idempotency key is used again.
        @raise sqlite3.IntegrityError: If the id, or the (api_key,
            idempotency_key) pair, is already stored.
        """
        self._conn().execute(
            "INSERT INTO emails (id, api_key, payload, idempotency_key,"
            " fingerprint, request_headers, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                email.id,
                email.api_key,
                json.dumps(email.payload, ensure_ascii=False),
                email.idempotency_key,
                fingerprint,
                json.dumps(email.request_headers, ensure_ascii=False),
                email.created_at,
            ),
        )

    def emails(self) -> list[StoredEmail]:
        """
        Return every stored email, in insertion order.
        """
        rows = self._conn().execute(f"SELECT {_COLUMNS} FROM emails ORDER BY seq")
        return [_row_to_email(row) for row in rows]

    def emails_for_key(self, api_key: str) -> list[StoredEmail]:
        """
        Return the emails sent with C{api_key}, in insertion order.
        """
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM emails WHERE api_key = ? ORDER BY seq",
            (api_key,),
        )
        return [_row_to_email(row) for row in rows]

    def get(self, email_id: str) -> StoredEmail | None:
        """
        Return the email with id C{email_id}, or L{None}.
        """
        row = (
            self._conn()
            .execute(f"SELECT {_COLUMNS} FROM emails WHERE id = ?", (email_id,))
            .fetchone()
        )
        return None if row is None else _row_to_email(row)

    def find_idempotent(
        self, api_key: str, idempotency_key: str
    ) -> tuple[StoredEmail, str] | None:
        """
        Return the email earlier stored under (C{api_key}, C{idempotency_key})
        together with its body fingerprint, or L{None}.
        """
        row = (
            self._conn()
            .execute(
                f"SELECT {_COLUMNS}, fingerprint FROM emails"
                " WHERE api_key = ? AND idempotency_key = ?",
                (api_key, idempotency_key),
            )
            .fetchone()
        )
        if row is None:
            return None
        return _row_to_email(row[:-1]), row[-1]

    def clear(self) -> int:
        """
        Delete every stored email (and so every idempotency record).

        @return: How many emails were deleted.
        """
        return self._conn().execute("DELETE FROM emails").rowcount

    def close(self) -> None:
        """
        Close the database. Closing twice is harmless.
        """
        if self._db is not None:
            self._db.close()
            self._db = None
