"""Download a file from a list of mirrors with a SHA-256 check and a time budget.

Offline machines must never hang here: the whole attempt (every mirror) gets
one time budget in seconds, each connection and read uses the remaining
budget as its socket timeout, and the host name is resolved in a worker
thread so a stuck DNS lookup cannot outlast the budget either (the proxy's
name, when a proxy is configured for the scheme). A file is
written (atomically) only after its checksum matched.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from qs4d_np.io import atomic_write_bytes


class DownloadError(RuntimeError):
    """Every mirror failed; the message lists why for each URL."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _resolves(host: str, port: int, timeout: float) -> None:
    """Raise OSError unless ``host`` resolves within ``timeout`` seconds."""
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    # a daemon thread: a lookup stuck in the C resolver can neither block us nor interpreter exit
    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise OSError(f"name lookup for {host} took longer than {timeout:.1f} s")
    if outcome[0] is not None:
        raise outcome[0]


def _set_read_timeout(response: http.client.HTTPResponse, seconds: float) -> None:
    """Shrink the socket timeout of an open response to the remaining budget.

    The timeout given to ``open`` is fixed when the connection is made; the
    socket sits behind the response's buffered reader (CPython's layout).
    """
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.01))


def _get(url: str, deadline: float, max_bytes: int) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("time budget used up before this mirror was tried")
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")  # the proxy resolves the target
    _resolves(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), remaining)
    chunks, total = [], 0
    # a fresh opener reads the proxy settings now (urlopen caches the first ones it saw)
    opener = urllib.request.build_opener()
    with opener.open(url, timeout=max(deadline - time.monotonic(), 0.01)) as response:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"download slower than the time budget ({total} bytes so far)")
            _set_read_timeout(response, remaining)
            # read1: return what has arrived instead of waiting for a full chunk, so a
            # server that trickles bytes cannot hold one read past the budget
            chunk = response.read1(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ValueError(f"more than the expected {max_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def fetch(filename: str, sha256: str, mirrors: Sequence[str], dest_dir: str | os.PathLike, *,
          timeout: float, max_bytes: int = 1 << 30) -> Path:
    """Download ``filename`` from the first mirror that serves bytes with the given SHA-256.

    ``mirrors`` are base URLs (``filename`` is appended). ``timeout`` is the
    total budget in seconds for all mirrors. The verified file is written
    atomically to ``dest_dir / filename``; nothing is written on failure.
    Raises :class:`DownloadError` listing every mirror's failure.
    """
    deadline = time.monotonic() + timeout
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            data = _get(url, deadline, max_bytes)
        # TimeoutError and URLError are OSErrors; a cut connection can raise HTTPException
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"{url}: {exc}")
            continue
        digest = sha256_hex(data)
        if digest != sha256:
            failures.append(f"{url}: SHA-256 {digest} does not match the expected {sha256}")
            continue
        target = Path(dest_dir) / filename
        atomic_write_bytes(target, data)
        return target
    raise DownloadError(f"could not download {filename} within {timeout:.1f} s:\n  " + "\n  ".join(failures))
