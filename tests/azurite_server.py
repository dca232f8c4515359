"""Azurite (Microsoft's Azure Storage emulator) on loopback, for queued-ingestion tests.

Installed by ``npm ci --prefix tests/azurite`` (``.ci/run`` does it). :class:`Azurite`
starts it on free loopback ports (``--blobPort 0`` etc., the ports read back from its
output), in memory (``--inMemoryPersistence``), and stops it::

    with Azurite() as storage:
        storage.connection_string      # for azure-storage-blob / -queue clients
        storage.sas("blob")            # an account SAS for the blob (or queue) service

:func:`skip_reason` says why it cannot run here (no Node.js, or the package is not
installed), for ``pytest.skip``.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "azurite"
ENTRY = HERE / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"

#: Azurite's built-in development account (its documented, public well-known key)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_LISTENING = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at (http://[\d.]+:\d+)")


def skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed: Azurite (the Azure Storage emulator) needs it"
    if not ENTRY.exists():
        return "Azurite is not installed: run `npm ci --prefix tests/azurite` (.ci/run does)"
    return None


class Azurite:
    """One Azurite process (blob, queue and table services) on 127.0.0.1."""

    def __init__(self, *, start_timeout: float = 60.0) -> None:
        self.start_timeout = start_timeout
        self.endpoints: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._output: list[str] = []

    def start(self) -> Azurite:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self._workdir = tempfile.TemporaryDirectory(prefix="azurite-")
        cmd = [
            shutil.which("node") or "node", str(ENTRY),
            "--blobHost", "127.0.0.1", "--blobPort", "0",
            "--queueHost", "127.0.0.1", "--queuePort", "0",
            "--tableHost", "127.0.0.1", "--tablePort", "0",
            "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
        ]
        self._proc = subprocess.Popen(
            cmd, cwd=self._workdir.name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True,
        )
        ready = threading.Event()

        def read() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                if len(self._output) < 200:
                    self._output.append(line.rstrip())
                m = _LISTENING.search(line)
                if m:
                    self.endpoints[m.group(1).lower()] = f"{m.group(2)}/{ACCOUNT}"
                    if len(self.endpoints) == 3:
                        ready.set()

        threading.Thread(target=read, name="azurite-output", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not ready.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                out = "\n".join(self._output[-20:])
                self.stop()
                raise RuntimeError(f"Azurite did not start:\n{out}")
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.endpoints['blob']};QueueEndpoint={self.endpoints['queue']};"
            f"TableEndpoint={self.endpoints['table']};"
        )

    def sas(self, service: str, hours: float = 24.0) -> str:
        """An account SAS (all permissions) for ``service``: "blob" or "queue"."""
        expiry = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours)
        mod: Any
        if service == "blob":
            import azure.storage.blob as mod
        elif service == "queue":
            import azure.storage.queue as mod
        else:
            raise ValueError(f"no SAS helper for {service!r}")
        return mod.generate_account_sas(  # type: ignore[no-any-return]
            ACCOUNT, KEY, mod.ResourceTypes(service=True, container=True, object=True),
            mod.AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True,
                                      create=True, update=True, process=True),
            expiry,
        )
