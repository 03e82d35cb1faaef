"""Real services for the tests, started on this machine and stopped after: a PostgreSQL
server (Debian's ``postgresql``) on a temporary directory and port, and a Dask cluster
of a ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, each worker kept
running by a supervisor as systemd or Kubernetes would (a worker exits when it loses
its scheduler)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from bncourse.benchmark import environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- PostgreSQL -------------------------------------------------------------------

def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the postgres user."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command] if os.geteuid() == 0 \
        else command


@contextmanager
def postgres_server(databases=("gradebook",)):
    """A PostgreSQL server of our own; yields {name: postgresql://postgres@127.0.0.1:PORT/name}."""
    bin_dir = _binaries()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is required in CI: `make system-deps` installs Debian's postgresql.")
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package; `make system-deps` as root).")
    with tempfile.TemporaryDirectory(prefix="bn-postgres-") as tmp:  # not pytest's: postgres must reach it
        folder = Path(tmp)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        data, port = folder / "data", free_port()
        run = lambda *args: subprocess.run(_as_postgres([f"{bin_dir}/{args[0]}", *args[1:]]), check=True,
                                           capture_output=True, text=True, timeout=120)
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        try:
            for name in databases:
                run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
            yield {name: f"postgresql://postgres@127.0.0.1:{port}/{name}" for name in databases}
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")


# --- Dask ---------------------------------------------------------------------------

DASK = [sys.executable, "-m", "dask"]


class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes (each worker with its nanny, one
    thread) on 127.0.0.1, restarted when they exit, until :meth:`stop`."""

    def __init__(self, folder: Path, workers: int = 2):
        self.folder, self.port = folder, free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * workers
        self.stopping = threading.Event()
        self.supervisor = threading.Thread(target=self._supervise, daemon=True)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "a")
        return subprocess.Popen([*DASK, *args], env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.folder, start_new_session=True)

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                     "--no-dashboard")

    def _start_worker(self, i: int) -> None:
        self.workers[i] = self._spawn(f"worker{i}", "worker", self.address, "--nthreads", "1", "--name", f"w{i}",
                                      "--no-dashboard", "--local-directory", str(self.folder / f"w{i}"))

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            for i, proc in enumerate(self.workers):
                if proc is None or proc.poll() is not None:
                    self._start_worker(i)
            self.stopping.wait(1.0)

    def start(self) -> "DaskCluster":
        self.start_scheduler()
        self.supervisor.start()
        self.wait_for_workers()
        return self

    def wait_for_workers(self, timeout: float = 300) -> None:
        from distributed import Client
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with Client(self.address, timeout=10) as client:
                    if len(client.scheduler_info()["workers"]) == len(self.workers):
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the Dask workers did not join {self.address}")

    def restart_scheduler(self) -> None:
        """The scheduler killed (SIGKILL) and started again on the same port."""
        self.scheduler.kill()
        self.scheduler.wait()
        time.sleep(1.0)
        self.start_scheduler()

    def worker_processes(self, i: int) -> list:
        """The processes of worker ``i``: its nanny, the worker, the worker's sandbox."""
        import psutil
        return [psutil.Process(self.workers[i].pid), *psutil.Process(self.workers[i].pid).children(recursive=True)]

    def stop(self) -> None:
        self.stopping.set()
        self.supervisor.join()
        for proc in [*self.workers, self.scheduler]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
