"""Durable storage of the server list: a JSON file written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

log = logging.getLogger(__name__)
T = TypeVar("T")


def off_the_event_loop(func: Callable[..., T], *args: Any) -> T:
    """Run `func(*args)` and return its result; under gevent, in a native thread.

    Under gunicorn's gevent worker every request shares one OS thread: a save's fsyncs there
    would stop all proxied traffic until the disk answered. In gevent's thread pool the
    caller still waits for the save (a registration is answered only once it is durable)
    while other requests go on. Without gevent (werkzeug's threaded server, the tests) the
    caller is a thread of its own already.
    """
    if "gevent.monkey" in sys.modules:  # imported only where gevent is in use
        from gevent import get_hub, monkey

        if monkey.is_module_patched("threading"):
            return cast(T, get_hub().threadpool.apply(func, args))
    return func(*args)


class StoreError(RuntimeError):
    """The state file could not be read or moved aside; starting would risk losing it."""


class JsonFileStore:
    """Keeps a list of JSON objects in one file; a crash leaves the old file or the new one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def _temp_prefix(self) -> str:
        return f".{self.path.name}."

    def load(self) -> list[Any]:
        """Return the stored list; a file that is not a JSON list is moved aside and an empty list returned.

        The entries are as the file holds them: the caller checks each one.
        """
        self._remove_stale_temp_files()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        problem = None
        try:
            entries = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:  # random bytes, latin-1 or UTF-16 text, a cut multi-byte character
            problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        except RecursionError:
            problem = "JSON nested too deeply to read"
        except ValueError as exc:
            problem = f"not valid JSON ({exc})"
        else:
            if not isinstance(entries, list):
                problem = "expected a JSON list of objects"
        if problem is not None:
            self.quarantine(problem)
            return []
        return entries

    def save(self, entries: list[dict[str, Any]]) -> None:
        """Replace the file's content with `entries`: temp file, fsync, rename, fsync folder."""
        folder = self.path.parent
        fd, temp_name = tempfile.mkstemp(prefix=self._temp_prefix, suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(_one_entry_per_line(entries))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, self.path)
        except BaseException:
            _remove_quietly(temp_name)
            raise
        _fsync_folder(folder)

    def quarantine(self, reason: str) -> Path:
        """Move the state file aside as `<file>.corrupt-<timestamp>` and log why."""
        target = aside_path(self.path)
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise StoreError(f"{self.path} is corrupt ({reason}) and could not be moved aside: {exc}") from exc
        log.error("state file %s is corrupt (%s); moved it to %s and started empty", self.path, reason, target)
        return target

    def keep_copy(self, reason: str) -> None:
        """Copy the state file aside, unchanged, before entries that failed to load are dropped."""
        target = aside_path(self.path)
        target.write_bytes(self.path.read_bytes())
        log.error("state file %s has bad entries (%s); kept a copy at %s", self.path, reason, target)

    def _remove_stale_temp_files(self) -> None:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        for stale in folder.glob(f"{self._temp_prefix}*.tmp"):
            log.warning("removing stale temp file %s left by an interrupted save", stale)
            _remove_quietly(stale)


def aside_path(path: Path) -> Path:
    """A free name beside `path` for a damaged copy: `<name>.corrupt-<timestamp>[-n]`."""
    stem = f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    target, n = path.with_name(stem), 1
    while target.exists():
        target, n = path.with_name(f"{stem}-{n}"), n + 1
    return target


def _one_entry_per_line(entries: list[dict[str, Any]]) -> str:
    """A JSON list with one object per line: readable, and about 4x cheaper than indent=2."""
    if not entries:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in entries) + "\n]\n"


def _remove_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
