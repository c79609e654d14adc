"""Reading an nkey seed, given as a value or as a file (the agent's and the replicator's NATS credentials)."""

from __future__ import annotations

from pathlib import Path

from .errors import CredentialsError


def read_seed(value: str | None = None, file: str | Path | None = None) -> str | None:
    """The seed `value`, else the first non-empty line of `file`, else None.

    An unreadable file raises CredentialsError naming the file (the OSError is kept as the cause).
    """
    if value and value.strip():
        return value.strip()
    if file:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise CredentialsError(f"cannot read the NATS nkey seed file {file}: {exc}") from exc
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return None
