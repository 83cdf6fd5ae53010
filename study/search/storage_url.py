"""What a storage URL names: the file behind it, whether it is an in-memory database, and its printable form.

Every command that takes STORAGE reads the URL the same way; messages print
it through `redact`, so a PostgreSQL password never lands in a terminal log.
"""

from __future__ import annotations

from pathlib import Path


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def storage_file(url: str) -> Path | None:
    """The file behind a SQLite or journal URL; None for a server (or in-memory) storage."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):].removeprefix("//"))
    path = sqlite_path(url)
    return None if path is None or str(path) in ("", ":memory:") else path


def is_in_memory(url: str) -> bool:
    """sqlite:// and sqlite:///:memory: (sqlite:/// with no path too): a database that lives and dies with one connection."""
    if not url.startswith("sqlite:"):
        return False
    rest = url[len("sqlite:"):].split("?", 1)[0]
    return rest in ("", "//", "///", "///:memory:", "//:memory:")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if url.startswith(("sqlite:", "journal:")):  # a file path, whose '@' is no password separator
        return url
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url
