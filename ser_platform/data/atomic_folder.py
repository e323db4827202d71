"""Folders a tool writes as a whole (``ser synth``'s corpus, ``ser prepare``'s dataset, ``ser cache``'s entries):
never half-written, never by two writers at once, and an existing folder replaced only if the tool wrote it.

    folder = AtomicFolder(out, writer="ser prepare", what="dataset", marker="...", is_ours=..., overwrite=...)
    with folder:                  # open(): lock, checks, a fresh hidden partial folder
        ...write into folder.partial...
        folder.commit()           # rename into place; an old folder there is removed only afterwards
    # leaving the block without commit (an exception, Ctrl-C, SIGTERM) removes the partial folder

The rules:

* **Where.** ``out`` is resolved, symlinks followed: a link to a dataset elsewhere is replaced at its target, so
  the link stays valid and nothing is written beside the link.
* **One writer.** An exclusive ``flock`` on ``.OUT.lock`` beside ``out``, taken without waiting: a second writer
  stops at once with an error naming the first one's host and pid. The lock file is removed when done (after
  the lock is held, the file's inode is checked against the path, so removing it cannot let two writers in).
  ``flock`` also works across hosts on NFSv4 and most cluster file systems; not on NFSv3 without lockd.
* **Overwrite only what the tool wrote.** A non-empty ``out`` is replaced only with ``overwrite=True`` and when
  ``is_ours(out)`` recognises the writer's marker (a dataset's summary, a corpus' marker file, a cache entry's
  metadata); an empty folder is a fine target.
* **Nothing to find later.** The partial folder is ``.OUT.partial-HOST-PID-RANDOM`` beside ``out`` (same file
  system, so the final rename is atomic). Holding the lock proves that no other writer of ``out`` is alive, so
  any ``.OUT.partial-*`` found at open is debris of a killed run (SIGKILL, a power cut) on any host, and is
  removed. While a folder is open, SIGTERM and SIGHUP (default action: die without cleaning up) raise
  ``SystemExit(128 + signal)`` instead, so the partial folder goes as it does on Ctrl-C (KeyboardInterrupt).
  Each of these signals is also recorded, and ``commit`` raises its exception again instead of committing: a
  library that swallows the exception (numpy's ``Generator.choice`` lost a Ctrl-C in a few runs of 100 of ``ser
  synth``, which then wrote its corpus to the end) cannot turn an interrupted write into a finished one.
  Parent folders that ``open`` created for ``out`` are removed again if the write does not complete.
* **Replace.** The old ``out`` is renamed to ``.OUT.old-*``, the partial one to ``out`` (signals held back
  between the two renames), and the old one is deleted last. A run killed between the renames leaves a
  ``.OUT.old-*`` and no ``out``: the next open puts it back.
* **Errors name the folder.** A folder that cannot be written (permission denied, read-only file system) and a
  write that runs out of room (no space left, quota, file size limit) raise ``DataError`` naming the folder.

On object storage (``s3://``, ``gs://``: ``ObjectStoreFolder``, the same interface) there is no rename and no
lock. The parts go straight to their final keys under ``out`` and the writer's own marker (a manifest such as a
dataset's ``_common_metadata``, which readers require) is written last, so a folder becomes readable only when
complete. An object ``IN_PROGRESS`` (who writes, since when) is put first and removed after the commit: a second
writer, or the next run after a killed one, finds it and stops naming it, unless ``overwrite=True`` (which then
clears it). An interrupted writer removes what it wrote. Replacing a complete folder (``overwrite=True``, only
one the tool wrote) removes its manifest first (it is no longer readable from that moment), then its objects:
without a rename the old folder cannot be kept until the new one is complete, so write to a new prefix to keep it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Callable

from ser_platform.data.errors import DataError

__all__ = ["AtomicFolder", "IN_PROGRESS", "ObjectStoreFolder", "lock_file", "resolved", "unlock_file"]

IN_PROGRESS = "_ser_write_in_progress"  # object-store marker of an unfinished write (readers skip "_" names)

# Errors of the writing side: the output's file system is full or refuses writes. Converted to DataError.
_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit exceeded", errno.EROFS: "read-only file system"}
_CLEANUP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)
_open_count = 0
_saved_handlers: dict[int, object] = {}
_received: list[int] = []  # the signals above and SIGINT, as they arrived while a folder was open
# Folders that open() created in this process: a failed write removes them again if empty, also when another
# folder created them (the encoder cache's layers share their key folders).
_made_here: set[Path] = set()


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with ``~`` expanded and every symlink and ``..`` resolved (the real location)."""
    return Path(path).expanduser().resolve()


def _interrupted(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _record_and_raise(signum: int, frame) -> None:
    _received.append(signum)
    raise _interrupted(signum)


def _hold_signals_for_cleanup() -> None:
    """While a folder is open, turn SIGTERM/SIGHUP into SystemExit and record them and Ctrl-C (main thread only;
    handlers someone else installed are left alone)."""
    global _open_count
    _open_count += 1
    if _open_count > 1 or threading.current_thread() is not threading.main_thread():
        return
    _received.clear()
    for signum in _CLEANUP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            _saved_handlers[signum] = signal.signal(signum, _record_and_raise)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's own Ctrl-C: the same, recorded
        _saved_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, _record_and_raise)


def _raise_if_interrupted() -> None:
    """Before a commit: a signal that arrived while the folder was open stops it, even where the exception it
    raised was swallowed on the way."""
    if _received:
        raise _interrupted(_received[0])


def _release_signals() -> None:
    global _open_count
    _open_count = max(0, _open_count - 1)
    if _open_count == 0:
        _received.clear()  # an interrupted write's signal never stops a later one (from any thread)
    if _open_count == 0 and threading.current_thread() is threading.main_thread():
        for signum, handler in list(_saved_handlers.items()):
            signal.signal(signum, handler)
            del _saved_handlers[signum]


def _remove_tree(path: Path) -> None:
    """Remove a folder of ours, read-only ones included (a dataset someone made read-only to protect it:
    replacing it with --overwrite was asked for). What cannot be removed is named in a warning."""
    def writable_then_retry(function, failed, _):
        os.chmod(os.path.dirname(failed), 0o700)
        function(failed)

    try:
        shutil.rmtree(path, onerror=writable_then_retry)
    except OSError as err:
        warnings.warn(f"{path}: could not remove it ({err.strerror or err}); remove it yourself", stacklevel=2)


def lock_file(path: Path, *, holder: str = "", wait: bool = False) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if absent): its descriptor, or None if another process holds
    it and ``wait`` is false. ``holder`` (who takes it) is written into the file for the error others see.
    Safe against ``unlock_file`` removing the file meanwhile: a lock taken on a removed file is dropped and the
    new file locked instead, so two processes never both hold ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False  # its holder removed it as we took it: take the new one
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())
            return fd
        os.close(fd)


def unlock_file(path: Path, fd: int) -> None:
    """Remove the lock file (while still holding it, see ``lock_file``), then release it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


def _problem(err: OSError) -> str:
    return err.strerror or str(err)


class AtomicFolder:
    """One folder written as a whole (module docstring). ``writer`` names the tool in messages (``ser
    prepare``), ``what`` the kind of folder (``dataset``), ``marker`` what ``is_ours`` looks for."""

    def __init__(self, out: str | Path, *, writer: str, what: str, marker: str, is_ours: Callable[[Path], bool],
                 overwrite: bool):
        self.out = resolved(out)
        self.writer, self.what, self.marker = writer, what, marker
        self.is_ours, self.overwrite = is_ours, overwrite
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self.partial: Path | None = None
        self.committed = False
        self._lock_fd: int | None = None
        self._signals_held = False

    # --- opening ------------------------------------------------------------------------------------------------

    def __enter__(self) -> "AtomicFolder":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
        full = self.out_of_room(exc) if isinstance(exc, OSError) else None
        if full is not None:
            raise full from exc

    def out_of_room(self, err: OSError) -> DataError | None:
        """The ``DataError`` naming ``out`` for a write that ran out of room (module docstring), else None."""
        if err.errno not in _NO_ROOM:
            return None
        return DataError(self.out, f"cannot write the {self.what}: {_NO_ROOM[err.errno]} ({err}); nothing was "
                                   "written, free some space or choose another output folder")

    def open(self) -> "AtomicFolder":
        """Lock, clear a killed run's debris, check the target and create the partial folder."""
        _hold_signals_for_cleanup()
        self._signals_held = True
        try:
            self._make_parents()
            self._lock()
            self._clear_debris()
            self._check_target()
            self.partial = self.out.parent / (f".{self.out.name}.partial-{socket.gethostname()}-{os.getpid()}-"
                                              f"{secrets.token_hex(4)}")
            self.partial.mkdir()
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError) and (err.errno in _NO_ROOM or err.errno in (errno.EACCES, errno.EPERM)):
                where = err.filename or self.out.parent
                raise DataError(where, f"cannot write the {self.what} {self.out} here ({_problem(err)}); choose "
                                       "an output folder you can write to") from None
            raise
        return self

    def _make_parents(self) -> None:
        missing = []
        parent = self.out.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise DataError(parent, f"is a file, not a folder; cannot write the {self.what} {self.out} under it")
        for folder in reversed(missing):
            folder.mkdir()
            _made_here.add(folder)

    def _lock(self) -> None:
        self._lock_fd = lock_file(self.lock_path, holder=f"`{self.writer}`, pid {os.getpid()} on "
                                                         f"{socket.gethostname()}")
        if self._lock_fd is None:
            try:
                holder = self.lock_path.read_text(errors="replace").strip() or "another process"
            except OSError:
                holder = "another process"
            raise DataError(self.out, f"another writer is writing this {self.what} now ({holder}); wait for it "
                                      "to finish or choose another output folder")

    def _check_target(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise DataError(out, f"exists and is not a folder; choose another output for the {self.what}")
        if not out.exists() or not any(out.iterdir()):
            return  # nothing there, or an empty folder: nothing to lose
        if not self.overwrite:
            raise FileExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it (the "
                                  f"old {self.what} is kept until the new one is complete)")
        if not self.is_ours(out):
            article = "an" if self.what[0] in "aeiou" else "a"
            raise DataError(out, f"exists and is not {article} {self.what} written by `{self.writer}` (no "
                                 f"{self.marker}); "
                                 "refusing to replace it: remove it yourself or choose another output folder")

    def _clear_debris(self) -> None:
        """Partial and old folders of ``out`` left by a killed run (the lock says no writer is alive)."""
        for path in sorted(self.out.parent.glob(f".{self.out.name}.partial-*")):
            _remove_tree(path)
        for path in sorted(self.out.parent.glob(f".{self.out.name}.old-*")):
            if not self.out.exists() and path.is_dir() and self.is_ours(path):
                os.rename(path, self.out)  # killed between the two renames of a replace: put it back
            else:
                _remove_tree(path)

    # --- closing ------------------------------------------------------------------------------------------------

    def commit(self) -> Path:
        """Move the complete partial folder to ``out``; an old folder there is removed only afterwards."""
        if self.partial is None or self.committed:
            raise RuntimeError(f"{self.out}: commit() without open(), or twice")
        _raise_if_interrupted()
        old = None
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_CLEANUP_SIGNALS})
        try:
            if self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            elif self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.out, old)
            try:
                os.rename(self.partial, self.out)
            except BaseException:
                if old is not None:
                    os.rename(old, self.out)
                raise
            self.committed = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if old is not None:
            _remove_tree(old)
        self._release()
        return self.out

    def abort(self) -> None:
        """Remove the partial folder, release the lock, remove the parent folders ``open`` created."""
        if self.partial is not None and not self.committed:
            shutil.rmtree(self.partial, ignore_errors=True)
        self._release()
        folder = self.out.parent
        while folder in _made_here:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: another writer's, or someone else's files appeared; keep it and its parents
            _made_here.discard(folder)
            folder = folder.parent

    def _release(self) -> None:
        if self._lock_fd is not None:
            unlock_file(self.lock_path, self._lock_fd)
            self._lock_fd = None
        if self._signals_held:
            _release_signals()
            self._signals_held = False


class ObjectStoreFolder:
    """A folder written as a whole on object storage (module docstring): ``with ObjectStoreFolder(uri, ...) as
    folder:`` write under ``folder.partial`` (the final prefix, in ``folder.filesystem``), the marker file last,
    then ``folder.commit()``. ``is_ours(uri)`` recognises a complete folder the tool wrote; ``marker`` names its
    manifest (the file ``overwrite`` removes first)."""

    def __init__(self, uri: str, *, writer: str, what: str, marker: str, manifest: str,
                 is_ours: Callable[[str], bool], overwrite: bool):
        import pyarrow.fs as pafs

        self.uri = str(uri).rstrip("/")
        self.writer, self.what, self.marker, self.manifest = writer, what, marker, manifest
        self.is_ours, self.overwrite = is_ours, overwrite
        try:
            self.filesystem, self.partial = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as err:
            raise DataError(self.uri, f"cannot open this location ({err})") from None
        self.partial = self.partial.rstrip("/")
        self.committed = False
        self._owned = False  # the in-progress object is ours: abort may remove what is under the prefix
        self._signals_held = False

    def __enter__(self) -> "ObjectStoreFolder":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def _names(self) -> list[str]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.partial, recursive=False, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    def _holder(self) -> str:
        try:
            with self.filesystem.open_input_stream(f"{self.partial}/{IN_PROGRESS}") as handle:
                return handle.read().decode(errors="replace").strip() or "unknown writer"
        except OSError:
            return "unknown writer"

    def open(self) -> "ObjectStoreFolder":
        """Check the target, clear it if ``overwrite`` allows, and put the in-progress object."""
        import time

        _hold_signals_for_cleanup()
        self._signals_held = True
        try:
            names = self._names()
            if names:
                self._check_target(names)
                self._clear()
            holder = f"`{self.writer}`, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%c')}"
            with self.filesystem.open_output_stream(f"{self.partial}/{IN_PROGRESS}") as handle:
                handle.write(holder.encode())
            self._owned = True
        except FileExistsError:  # the target's own refusal, already worded
            self.abort()
            raise
        except OSError as err:
            self.abort()
            raise DataError(self.uri, f"cannot write the {self.what} here ({err})") from None
        except BaseException:
            self.abort()
            raise
        return self

    def _check_target(self, names: list[str]) -> None:
        if IN_PROGRESS in names and not self.overwrite:
            raise DataError(self.uri, f"an unfinished {self.what} is here ({self._holder()}): another writer is "
                                      "at work, or one was killed; pass --overwrite to replace it")
        if IN_PROGRESS in names:
            return
        if not self.is_ours(self.uri):
            raise DataError(self.uri, f"holds objects that are not a {self.what} written by `{self.writer}` (no "
                                      f"{self.marker}); refusing to replace them: remove them yourself or choose "
                                      "another prefix")
        if not self.overwrite:
            raise FileExistsError(f"{self.uri}: already exists; pass --overwrite (overwrite=True) to replace it (on "
                                  "object storage the old one is gone once the new one starts: no rename)")

    def _clear(self) -> None:
        """The manifest first (no reader takes a half-replaced folder for a complete one), then the rest."""
        manifest = f"{self.partial}/{self.manifest}"
        try:
            self.filesystem.delete_file(manifest)
        except FileNotFoundError:
            pass
        self.filesystem.delete_dir_contents(self.partial, missing_dir_ok=True)

    def commit(self) -> str:
        """The folder is complete (its manifest written last): remove the in-progress object."""
        if not self._owned or self.committed:
            raise RuntimeError(f"{self.uri}: commit() without open(), or twice")
        _raise_if_interrupted()
        self.filesystem.delete_file(f"{self.partial}/{IN_PROGRESS}")
        self.committed = True
        self._release()
        return self.uri

    def abort(self) -> None:
        """Remove what this writer put under the prefix (it held the in-progress object), then let go."""
        if self._owned and not self.committed:
            try:
                self.filesystem.delete_dir(self.partial)  # the objects, and the empty marker pyarrow keeps
            except FileNotFoundError:
                pass
            except OSError as err:
                warnings.warn(f"{self.uri}: could not remove the unfinished {self.what} ({err}); remove it "
                              "yourself", stacklevel=2)
            self._owned = False
        self._release()

    def _release(self) -> None:
        if self._signals_held:
            _release_signals()
            self._signals_held = False
