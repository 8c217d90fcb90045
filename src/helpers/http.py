"""What the project's HTTP clients (Civitai, OpenAI-compatible endpoints) share: when to retry, how long to wait."""
from __future__ import annotations

import email.utils
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def backoff_delay(attempt: int, retry_after: str | None, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry `attempt` (0-based).

    The server's `Retry-After` wins when present (seconds or an HTTP date); otherwise base·2^attempt with
    ±50 % jitter, so that many clients backing off together do not retry in lockstep. Capped at `cap`.
    """
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), cap)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after)
                return min(max(0.0, when.timestamp() - time.time()), cap)
            except (TypeError, ValueError):  # unreadable header: use our own schedule
                pass
    return min(cap, base * 2 ** attempt) * rng.uniform(0.5, 1.5)


def _room_for(have: int, length: int, partial: Path, make_room: Callable[[int], None] | None, no_room: str) -> None:
    """`length` more bytes for a file of which `have` are on disk: room made for the whole file, free space checked
    for the rest."""
    import errno
    import shutil

    if make_room is not None:
        make_room(have + length)
    free = shutil.disk_usage(partial.parent).free
    if length > free:
        raise OSError(errno.ENOSPC, f"{partial.name.removesuffix('.part')} needs {length / 1e9:.2f} GB more and "
                                    f"{partial.parent} has {free / 1e9:.2f} GB free: {no_room}")


@contextmanager
def file_lock(lock: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold a POSIX `flock` on the file `lock` (made if missing) for the block, exclusive or `shared`; yields whether
    it was taken (False only when `wait=False` and another holder has it). Two runs sharing a weights cache take
    turns on a download this way, and a file being loaded is kept from eviction. Without `fcntl` (Windows) nothing
    is locked and it yields True: one run at a time is up to the user."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    Path(lock).parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            taken = True
        except BlockingIOError:
            taken = False
        try:
            yield taken
        finally:
            if taken:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _range_total(content_range: str | None) -> int | None:
    """N from a `Content-Range: bytes */N` (or `bytes a-b/N`) header, if the server gave it."""
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def download_to(url: str, target: Path, *, headers: dict[str, str] | None = None, refused: str = "", attempts: int = 6,
                base_delay: float = 2.0, cap: float = 120.0, timeout: float = 60.0, progress: bool = True,
                sleep: Callable[[float], None] = time.sleep, make_room: Callable[[int], None] | None = None,
                no_room: str = "free space on it") -> Path:
    """Fetch `url` to `target`, through a dropped connection, a timeout or a retryable status (`RETRY_STATUS`).

    The bytes go to `<target>.part`, which stays when the run stops: the next attempt, or the next run, asks only for
    the rest (an HTTP Range request; a server that ignores it sends everything again, which replaces the part). Only
    a complete file gets the real name. 401 and 403 raise PermissionError at once (`refused`, with `{status}`, says
    what to do); other errors of the request raise.

    Once the server has said how many bytes are coming, `make_room(bytes)` may free disk (a capped cache removing
    old files), and if the disk still has less free than that, OSError(ENOSPC) says so before a byte is written
    (`no_room` says what to do), instead of a full disk part-way through a file of gigabytes.
    """
    import requests
    from tqdm.auto import tqdm

    target = Path(target)
    if target.exists():
        return target
    partial = target.with_name(f"{target.name}.part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    rng, error, lock = random.Random(url), "", target.with_name(f"{target.name}.lock")
    with file_lock(lock):
        if target.exists():  # another run finished it while this one waited for the lock
            return target
        for attempt in range(attempts):
            have = partial.stat().st_size if partial.exists() else 0
            # identity: the bytes counted against Content-Length and a Range offset are the file's own
            asked = {**(headers or {}), "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
            try:
                with requests.get(url, headers=asked, stream=True, timeout=timeout) as reply:
                    if reply.status_code in (401, 403):
                        raise PermissionError((refused or "{url} answered {status}").format(url=url,
                                                                                            status=reply.status_code))
                    if reply.status_code == 416 and _range_total(reply.headers.get("Content-Range")) == have:
                        break  # the part holds the whole file already: the last run stopped before renaming it
                    if reply.status_code == 416 or reply.status_code in RETRY_STATUS:
                        error = f"HTTP {reply.status_code}"
                        if reply.status_code == 416:  # the part does not fit this file: start over
                            partial.unlink(missing_ok=True)
                        sleep(backoff_delay(attempt, reply.headers.get("Retry-After"), base_delay, cap, rng))
                        continue
                    reply.raise_for_status()
                    if reply.status_code != 206:  # the whole file, from the first byte
                        have = 0
                    length = int(reply.headers.get("Content-Length") or 0) or None
                    if length is not None:
                        _room_for(have, length, partial, make_room, no_room)
                    with open(partial, "ab" if have else "wb") as handle, \
                            tqdm(total=have + length if length else None, initial=have, unit="B", unit_scale=True,
                                 desc=target.name, leave=False, disable=not progress) as bar:
                        for chunk in reply.iter_content(1 << 20):
                            handle.write(chunk)
                            bar.update(len(chunk))
                if length is not None and partial.stat().st_size != have + length:
                    raise requests.ConnectionError(f"{partial.stat().st_size - have} of {length} bytes arrived")
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as caught:
                error = f"{type(caught).__name__}: {caught}"
                sleep(backoff_delay(attempt, None, base_delay, cap, rng))
        else:
            kept = partial.stat().st_size if partial.exists() else 0
            raise ConnectionError(f"{url}: no complete download after {attempts} attempts (last: {error}); the "
                                  f"{kept:,} bytes fetched so far stay in {partial}, and a rerun asks only for the rest")
        os.replace(partial, target)
        # a run still waiting holds the old lock and then finds the file; a later one finds it before locking
        lock.unlink(missing_ok=True)
    return target
