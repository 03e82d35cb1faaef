"""The sandbox a submission runs in: bubblewrap, an unprivileged user, limits.

:class:`Sandbox` starts ``python -m bncourse.kernel`` (a warm zygote) under
Debian's ``bwrap`` as an unprivileged user id of its own, in new user, PID,
network, IPC, UTS and cgroup namespaces, with a minimal read-only view of the
system: ``/usr`` (and the ``/bin``, ``/lib`` links), ``/etc``, the Python
installation, the virtual environment and this package - not the course
directory (solutions, gradebook, submissions), not ``bn_reference``, not any home
directory. The learner package (``bn_exercises``) is there, read-only: it holds no
answer. The only writable places are a size-limited ``/tmp`` and ``/dev/shm`` and
the IPC namespace's message queues, all wiped after every notebook.

Limits: each notebook's process gets limits on address space, CPU time, processes
and file size, and the grader wall-clock limits per cell and per notebook. A memory
cgroup per sandbox (where the machine offers one: :class:`MemoryCgroup`) counts
every page the notebook causes - shared memory and tmpfs pages included, which
the address-space limit does not see. A seccomp filter refuses new user
namespaces (a notebook could otherwise mount a tmpfs of its own and fill memory
past every limit), kernel keyrings (per user: they would outlive the notebook) and
BPF.

:func:`probe` says what isolation this machine can give; without bubblewrap (or
with ``isolation=False``, which the instructor must ask for) the kernel runs as
a plain subprocess with the same limits but no namespaces: a submission can then
read and write everything the instructor can.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bn_exercises
import bncourse
from bncourse import protocol

GiB = 2**30
MiB = 2**20
KERNEL_ALLOWANCE = 1 * GiB   # the warm kernel's own memory (imports), beside the notebook's


@dataclass(frozen=True)
class Limits:
    """What one notebook may use. Times in seconds, sizes in bytes."""

    cell_timeout: float = 30.0        # wall clock per cell (a grade cell includes its checks)
    notebook_timeout: float = 300.0   # wall clock for the whole notebook
    memory: int = 2 * GiB             # address space beyond what the warm kernel already maps
    cpu: int = 300                    # CPU seconds for the whole notebook
    processes: int = 64               # processes and threads of the notebook's user
    file_size: int = 64 * MiB         # largest file it may write
    tmp_size: int = 512 * MiB         # its writable /tmp (and, as much again, /dev/shm)

    def for_kernel(self) -> dict:
        return {"memory": self.memory, "cpu": self.cpu, "processes": self.processes, "file_size": self.file_size}


class IsolationUnavailable(RuntimeError):
    """bubblewrap cannot sandbox a submission on this machine (the message says why)."""


class SessionDied(RuntimeError):
    """The notebook's process ended, or stopped answering, before its reply came."""


def _bwrap() -> str | None:
    return shutil.which("bwrap")


def _setpriv() -> str | None:
    return shutil.which("setpriv")


def _system_view() -> list[str]:
    """bwrap arguments for a read-only view of the system and of the Python in use."""
    args = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    packages = [str(Path(p.__file__).resolve().parent) for p in (bncourse, bn_exercises)]
    made = set()
    for path in [*sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), sys.prefix}), *packages]:
        if path.startswith("/usr/"):
            continue
        for parent in reversed(Path(path).parents[:-1]):  # mount points to pass through, not list (bwrap: 0700)
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0711", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
    # bn_reference stays out, wherever it is installed (the kernel stands in for it)
    import bn_reference
    hidden = str(Path(bn_reference.__file__).resolve().parent)
    if any(hidden.startswith(p + "/") for p in (os.path.realpath(sys.prefix), sys.prefix)):
        args += ["--tmpfs", hidden]
    return args


def seccomp_program() -> bytes | None:
    """The sandbox's seccomp filter as BPF (libseccomp builds it); ``None`` without libseccomp.

    Refused: creating a user namespace (``unshare`` or ``clone`` with CLONE_NEWUSER;
    ``clone3``, whose flags a filter cannot read, answers ENOSYS so that the C library
    falls back to ``clone``), the kernel keyrings (``keyctl``, ``add_key``,
    ``request_key``) and ``bpf``. Everything else is allowed."""
    import errno
    try:
        import pyseccomp as seccomp
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    except (ImportError, OSError, RuntimeError):
        return None
    newuser = 0x10000000  # CLONE_NEWUSER
    for call in ("unshare", "clone"):
        rules.add_rule(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(0, seccomp.MASKED_EQ, newuser, newuser))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for call in ("keyctl", "add_key", "request_key", "bpf"):
        rules.add_rule(seccomp.ERRNO(errno.EPERM), call)
    with tempfile.TemporaryFile() as f:
        rules.export_bpf(f)
        f.seek(0)
        return f.read()


class MemoryCgroup:
    """A memory cgroup for one sandbox, below the grader's own (cgroup v2, or v1's memory
    hierarchy): every page its processes cause counts against ``limit`` - their memory,
    and the shared-memory and tmpfs pages they fill. :meth:`create` returns ``None`` where
    the machine does not let the grader make one (not root, no memory controller)."""

    def __init__(self, path: Path, limit_file: str):
        self.path, self.limit_file = path, limit_file

    @classmethod
    def create(cls, name: str) -> "MemoryCgroup | None":
        for parent, limit_file in cls._parents():
            path = parent / name
            try:
                if path.is_dir():
                    cls(path, limit_file).remove()
                path.mkdir()
                if (path / limit_file).is_file():
                    return cls(path, limit_file)
                path.rmdir()
            except OSError:
                continue
        return None

    @staticmethod
    def _parents():
        """(folder of the grader's own cgroup, limit file) for each hierarchy with a memory
        controller: cgroup v2's unified one, v1's memory one."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    own = mount / path.lstrip("/")
                    available = own / "cgroup.controllers"
                    if available.is_file() and "memory" in available.read_text().split():
                        yield own, "memory.max"
            elif "memory" in controllers.split(","):
                yield Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"

    def set_limit(self, limit: int) -> None:
        (self.path / self.limit_file).write_text(str(int(limit)))

    def usage(self) -> int:
        name = "memory.current" if self.limit_file == "memory.max" else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for want of memory so far."""
        name = "memory.events" if self.limit_file == "memory.max" else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def limit_hits(self) -> int:
        """How many times this cgroup's memory reached its limit so far. A notebook at its
        limit may be killed by the kernel, or keep the kernel reclaiming (its libraries'
        pages, dropped and read again) until its time limit stops it: both are running out
        of memory."""
        try:
            if self.limit_file == "memory.max":
                for line in (self.path / "memory.events").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
                return 0
            return int((self.path / "memory.failcnt").read_text())
        except (OSError, ValueError):
            return 0

    def enter(self) -> None:
        """Move the calling process into the cgroup (its children follow)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)  # its last processes are still exiting


def probe(uid: int = 60_000) -> str:
    """A one-paragraph description of the isolation this machine gives a submission;
    :class:`IsolationUnavailable` when bubblewrap cannot run a sandbox here."""
    if _bwrap() is None:
        raise IsolationUnavailable("bubblewrap (bwrap) is not installed: install Debian's `bubblewrap` package "
                                   "(`make system-deps` does it as root).")
    if os.geteuid() == 0 and _setpriv() is None:
        raise IsolationUnavailable("setpriv (util-linux) is missing: it drops root before bwrap starts.")
    command = [_bwrap(), *_namespaces(), "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp",
               *_system_view(), "--", *_user(uid), sys.executable, "-c", "import os, socket; print(os.getuid(), socket.if_nameindex())"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise IsolationUnavailable(f"bubblewrap could not start a sandbox here: {proc.stderr.strip()[:300]}")
    version = subprocess.run([_bwrap(), "--version"], capture_output=True, text=True).stdout.strip()
    who = (f"as user {uid}+ (not root, no capabilities)" if os.geteuid() == 0 else
           "in a user namespace of its own (without root the per-notebook process limit is off)")
    cgroup = MemoryCgroup.create(f"bncourse-probe-{os.getpid()}")
    if cgroup is not None:
        cgroup.remove()
    memory = ("a memory cgroup counts every page a notebook causes (shared memory and tmpfs included)"
              if cgroup is not None else
              "NO memory cgroup here (it needs root and a memory controller): memory is bounded by the address "
              "space limit, which shared memory and tmpfs pages escape, and by the sizes of /tmp and /dev/shm")
    seccomp = ("a seccomp filter refuses new user namespaces, kernel keyrings and BPF"
               if seccomp_program() is not None else
               "NO seccomp filter (libseccomp is missing): a notebook may create user namespaces and mount "
               "file systems of its own")
    return (f"{version}: each submission runs {who} in new PID, network (no interface but its own "
            f"loopback), IPC, UTS and cgroup namespaces, sees the system and Python "
            f"read-only and neither the course directory (solutions, gradebook, other submissions) nor any "
            f"home directory, and writes only to its own /tmp and /dev/shm (size-limited) and to its IPC "
            f"namespace's shared memory, semaphores and message queues, all wiped after each notebook; "
            f"{seccomp}; {memory}.")


def _namespaces() -> list[str]:
    """bwrap's namespace options. As root, bwrap sets up the mounts with its privileges
    and :func:`_user` drops them inside; otherwise a user namespace is needed as well."""
    common = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
              "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        return [*common, "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return ["--unshare-user", *common]


def _user(uid: int) -> list[str]:
    """Inside the sandbox, run as an unprivileged user id of its own (when started as root):
    no capabilities, no way to regain them, process limits counted for that user alone."""
    if os.geteuid() != 0:
        return []
    return [_setpriv(), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


@dataclass
class Sandbox:
    """A warm kernel in a sandbox; it runs one notebook at a time (:meth:`open`).

    ``uid`` is the user id of its processes (use one per concurrent sandbox, so that
    process limits are counted per sandbox); ``isolation=False`` runs the kernel as a
    plain subprocess, without namespaces.
    """

    uid: int = 60_000
    limits: Limits = field(default_factory=Limits)
    isolation: bool = True
    process: subprocess.Popen | None = None
    control: socket.socket | None = None
    data: socket.socket | None = None
    healthy: bool = True
    cgroup: MemoryCgroup | None = None

    scratch: str = "/tmp"  # the notebooks' writable folder: the sandbox's own /tmp, or a temporary folder

    def environment(self) -> dict[str, str]:
        """The kernel's whole environment (nothing of the instructor's is passed on)."""
        return {"PATH": "/usr/bin:/bin", "HOME": f"{self.scratch}/home", "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1", "JOBLIB_MULTIPROCESSING": "0",
                "MPLBACKEND": "module://matplotlib_inline.backend_inline", "MPLCONFIGDIR": f"{self.scratch}/.matplotlib",
                "PYTHONPATH": os.pathsep.join(dict.fromkeys(str(Path(p.__file__).resolve().parents[1])
                                                            for p in (bncourse, bn_exercises)))}

    def command(self, control_fd: int, seccomp_fd: int | None = None) -> list[str]:
        kernel = [sys.executable, "-m", "bncourse.kernel", "--control-fd", str(control_fd), "--scratch", self.scratch]
        if not self.isolation:
            return kernel
        setenv = [a for k, v in self.environment().items() for a in ("--setenv", k, v)]
        filters = ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
        # /tmp first: a course that lives below /tmp is bound on top of it, not hidden by it
        return [_bwrap(), *_namespaces(), "--clearenv", *setenv, "--proc", "/proc", "--dev", "/dev",
                "--size", str(self.limits.tmp_size), "--perms", "1777", "--tmpfs", "/dev/shm",
                "--mqueue", "/dev/mqueue",
                "--size", str(self.limits.tmp_size), "--perms", "1777", "--tmpfs", "/tmp", *_system_view(),
                "--chdir", "/tmp", *filters, "--", *_user(self.uid), *kernel, "--isolated"]

    def start(self, timeout: float = 180.0) -> None:
        """Start the kernel and wait until it has imported everything; then bound the
        sandbox's memory: what the kernel holds now, plus the notebook's allowance."""
        ours, theirs = socket.socketpair()
        self._log = tempfile.TemporaryFile()
        if not self.isolation:
            self.scratch = tempfile.mkdtemp(prefix="bncourse-")
        program = seccomp_program() if self.isolation else None
        filter_fd = None
        if program is not None:
            filter_fd = os.memfd_create("bncourse-seccomp", 0)
            os.write(filter_fd, program)
            os.lseek(filter_fd, 0, os.SEEK_SET)
        self.cgroup = MemoryCgroup.create(f"bncourse-{os.getpid()}-{self.uid}") if self.isolation else None
        if self.cgroup is not None:
            self.cgroup.set_limit(KERNEL_ALLOWANCE + self.limits.memory + 2 * self.limits.tmp_size)
        try:
            self.process = subprocess.Popen(
                self.command(theirs.fileno(), filter_fd), pass_fds=[theirs.fileno(), *([filter_fd] if filter_fd else [])],
                env=self.environment(), cwd=self.scratch, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=self._log, start_new_session=True,
                preexec_fn=self.cgroup.enter if self.cgroup is not None else None)
        finally:
            if filter_fd is not None:
                os.close(filter_fd)
        theirs.close()
        self.control = ours
        ready = self._ask(None, timeout)
        if ready.get("op") != "ready":
            raise SessionDied(f"the kernel did not start: {self.log_tail()}")
        if self.cgroup is not None:  # now that the kernel's own memory is known
            self.cgroup.set_limit(self.cgroup.usage() + self.limits.memory)

    def log_tail(self) -> str:
        """The end of what the kernel wrote to its stdout/stderr (for diagnosing its death)."""
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace")

    def alive(self) -> bool:
        """Whether the kernel runs and may grade another notebook."""
        return self.process is not None and self.process.poll() is None and self.healthy

    def _ask(self, message: dict | None, timeout: float) -> dict:
        """Send ``message`` on the control socket (if any) and read the reply, all of it
        within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            if message is not None:
                self.control.settimeout(timeout)
                protocol.send(self.control, message)
            return protocol.recv(self.control, deadline=deadline)
        except (OSError, protocol.ProtocolError) as exc:
            raise SessionDied(f"the kernel stopped answering ({exc}): {self.log_tail()}") from None

    def open(self, timeout: float = 30.0) -> None:
        """Fork a fresh process for one notebook."""
        limits = self.limits.for_kernel()
        if not (self.isolation and os.geteuid() == 0):  # the process limit counts per user: only ours is ours
            limits["processes"] = None
        self._ask({"op": "start", "limits": limits}, timeout)
        _, fds, _, _ = socket.recv_fds(self.control, 1, 1)
        self.data = socket.socket(fileno=fds[0])
        self.request(None, timeout)

    def request(self, message: dict | None, timeout: float) -> dict:
        """Send a request to the notebook's process and wait up to ``timeout`` seconds for
        the whole reply. ``TimeoutError`` if it did not come (the process may still be
        running); :class:`SessionDied` if the process ended or sent garbage."""
        deadline = time.monotonic() + max(timeout, 0.01)
        try:
            if message is not None:
                self.data.settimeout(max(timeout, 0.01))
                protocol.send(self.data, message)
            return protocol.recv(self.data, deadline=deadline)
        except socket.timeout:
            raise TimeoutError(f"no reply within {timeout:.0f} s") from None
        except (OSError, protocol.ProtocolError) as exc:
            raise SessionDied(str(exc)) from None

    def oom_kills(self) -> int:
        """Processes killed for want of memory in this sandbox so far (0 without a cgroup)."""
        return self.cgroup.oom_kills() if self.cgroup is not None else 0

    def memory_limit_hits(self) -> int:
        """Times this sandbox's memory reached its limit so far (0 without a cgroup)."""
        return self.cgroup.limit_hits() if self.cgroup is not None else 0

    def interrupt(self) -> None:
        """SIGINT to the notebook's process (KeyboardInterrupt in the cell it runs)."""
        self._ask({"op": "interrupt"}, 10.0)

    def close(self) -> dict:
        """End the notebook: kill every process it started, wipe /tmp; returns how its
        process ended ({"ended": "exit", "code": 0}, {"ended": "signal", "signal": "SIGSEGV"}...)."""
        if self.data is not None:
            self.data.close()
            self.data = None
        ended = self._ask({"op": "stop"}, 60.0)
        self.healthy = bool(ended.get("healthy", True))
        return ended

    def shutdown(self) -> None:
        """Stop the kernel and the sandbox."""
        if self.alive():
            try:
                protocol.send(self.control, {"op": "exit"})
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        if self.control is not None:
            self.control.close()
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if not self.isolation and self.scratch != "/tmp":
            shutil.rmtree(self.scratch, ignore_errors=True)
