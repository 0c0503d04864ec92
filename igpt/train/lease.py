"""One owner per run name: a lease file in the run's folder, created atomically, kept alive by a heartbeat.

Two jobs submitted with the same ``--name`` (a double submit, a retry from a notebook while the first still runs)
would share one run folder and one MLflow run: each would log the other's steps and delete the other's
checkpoints, and the run would end FINISHED with a wrong history. The first job to create
``<run_dir>/owner.json`` (``O_CREAT | O_EXCL``: exactly one creator wins; on object storage, see
:meth:`Lease._write_new_remote`) owns the run until it exits; a second
one fails at once with the owner's identity. A dead owner's lease is taken over: at once when it ran on this
host and its process is gone, else once its heartbeat is older than ``ttl`` seconds (a lost node).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from igpt.errors import UserError
from igpt.storage import Loc

OWNER = "owner.json"


class RunNameTaken(UserError, RuntimeError):
    """Another live job owns this run name."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("RAY_JOB_ID", ""),
            "submission": os.environ.get("RAY_JOB_SUBMISSION_ID", ""), "started": time.time(),
            "token": uuid.uuid4().hex}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(owner: dict, ttl: float) -> str | None:
    """Why ``owner`` no longer holds its lease, or None while it does."""
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
        return f"its process {owner.get('pid')} on this host is gone"
    age = time.time() - float(owner.get("heartbeat", 0))
    if age > ttl:
        return f"its heartbeat is {age:.0f} s old (ttl {ttl:.0f} s)"
    return None


class Lease:
    """``with Lease(run_dir):`` holds the run name for the block; raises :class:`RunNameTaken` on entry when a
    live job holds it."""

    def __init__(self, run_dir: str | Path | Loc, ttl: float = 120.0, every: float = 10.0, settle: float = 2.0):
        self.loc = Loc(run_dir) / OWNER
        self.path = None if self.loc.remote else self.loc.local()
        self.settle = settle
        self.ttl, self.every = ttl, every
        self.me = _me()
        self.took_over: dict | None = None
        self.failure: str | None = None  # the heartbeat's last write error, while the storage fails
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_new(self) -> bool:
        if self.path is None:
            return self._write_new_remote()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({**self.me, "heartbeat": time.time()}, fh)
        return True

    def _write_new_remote(self) -> bool:
        """Object storage has no create-if-absent through pyarrow: write our lease if none is there, wait
        ``settle`` seconds, and read it back. Two jobs that both saw none both write; the store keeps the last
        PUT, and the one that reads back the other's token has lost. S3 and GCS read their own writes strongly,
        so this fails only if the two writes land more than ``settle`` seconds apart yet each before the other's
        check, which a double submit does not do (a best effort, not a lock)."""
        if self.loc.exists():
            return False
        self.loc.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
        time.sleep(self.settle)
        return (self._read().get("token")) == self.me["token"]

    def _read(self) -> dict:
        try:
            return json.loads(self.loc.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}  # vanished, or caught mid-write by a heartbeat: treated as not (yet) held

    def acquire(self) -> Lease:
        for _ in range(3):
            if self._write_new():
                break
            owner = self._read()
            why = _stale(owner, self.ttl) if owner else "its lease file was unreadable"
            if why is None:
                raise RunNameTaken(
                    f"run {self.loc.parent} is owned by a live job: host {owner.get('host')}, pid "
                    f"{owner.get('pid')}{', job ' + owner['submission'] if owner.get('submission') else ''}, "
                    f"heartbeat {time.time() - float(owner.get('heartbeat', 0)):.0f} s ago. Choose another --name, "
                    f"or stop that job (ray job stop) and submit again")
            self.took_over = {**owner, "why": why}
            self.loc.unlink()  # then race for it again: O_EXCL (locally) lets one taker win
        else:
            raise RunNameTaken(f"could not take over {self.loc}: another job keeps taking it")
        self._thread = threading.Thread(target=self._beat, name="igpt-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                owner = self._read()
                if owner and owner.get("token") != self.me["token"]:
                    return  # taken over (we were presumed dead): never write over the new owner
                self.loc.write_text(json.dumps({**self.me, "heartbeat": time.time()}))  # whole, never half
                self.failure = None
            except OSError as e:  # the storage failed: keep beating (it may come back); the last error stays here
                self.failure = f"cannot write {self.loc}: {type(e).__name__}: {e}"

    def release(self) -> None:
        """Stop the heartbeat and remove the lease. Never raises for the storage: this runs while a job's own
        error propagates (storage that turned unwritable would otherwise replace it with the lease's error);
        a lease left behind goes stale and the next job takes it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._read().get("token") == self.me["token"]:
                self.loc.unlink()
        except OSError as e:
            print(f"igpt: could not remove the run's lease {self.loc} ({type(e).__name__}: {e}); the next job "
                  "with this name takes it over once it is stale", file=sys.stderr)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
