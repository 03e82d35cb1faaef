"""The notebook process inside the sandbox: a warm zygote that forks one child per notebook.

Started by :class:`bncourse.sandbox.Sandbox` as ``python -m bncourse.kernel`` inside
bubblewrap. The zygote imports what notebooks use (numpy, torch, scikit-learn,
SciPy, matplotlib, IPython), so no notebook pays for kernel start or imports,
then obeys the grader on its control socket:

- ``start``: fork a child for one notebook, pass the grader a fresh socket to it;
- ``interrupt``: send the child SIGINT (a cell's time limit);
- ``stop``: kill every process in the sandbox but itself, wipe ``/tmp``, report
  how the child ended. The next notebook starts from the zygote's pristine memory.

The child runs cells with IPython (magics, display, matplotlib inline) and, on
request, a check's ``run`` on one of the notebook's objects (course code shipped
by the grader with cloudpickle, once per notebook; then only the cases travel). The
learner package ``bn_exercises`` is here (it holds no answer); the grader's is not:
``bn_reference`` imports resolve to stand-ins whose names raise
:class:`ReferenceNotAvailable` when used. The zygote is not dumpable, so a child
cannot read or trace it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.abc
import importlib.util
import os
import resource
import signal
import socket
import stat
import sys
import time
import types

from bncourse import protocol

SCRATCH = "/tmp"            # the notebooks' writable folder (the sandbox's private /tmp)
ISOLATED = False            # running in a PID namespace of our own
STREAM_LIMIT = 100_000      # characters of stdout/stderr kept per cell
DISPLAY_LIMIT = 2_000_000   # bytes of display data kept per cell
PR_SET_DUMPABLE = 4


class ReferenceNotAvailable(Exception):
    """The notebook used the course's reference implementation, which grading withholds."""


# --------------------------------------------------------------------------
# bn_reference, as the sandbox sees it

class _Poison(type):
    """A stand-in for a reference class or function: it can be named, imported and
    subclassed, but calling or instantiating it - or asking for its source, which
    starts by reading ``__module__`` - raises ReferenceNotAvailable."""

    def __call__(cls, *args, **kwargs):
        raise ReferenceNotAvailable(cls.__qualname__)

    @property
    def __module__(cls):  # noqa: A003 - shadows type.__module__ on purpose (inspect.getsource reads it)
        raise ReferenceNotAvailable(f"{cls.__qualname__}: the course's reference code is not available while grading")

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _poison(f"{cls.__qualname__}.{name}")


def _poison(qualname: str) -> type:
    return _Poison(qualname.rpartition(".")[2], (), {"__qualname__": qualname})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _poison(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``bn_reference`` and its submodules to :class:`_StubModule` objects."""

    def find_spec(self, name, path=None, target=None):
        if name == "bn_reference" or name.startswith("bn_reference."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


# --------------------------------------------------------------------------
# The IPython shell and what a cell produces

def _make_shell():
    """An IPython shell that records outputs as nbformat dicts instead of printing."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class Hook(DisplayHook):
        def start_displayhook(self):
            pass

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            self.shell.record({"output_type": "execute_result", "data": format_dict,
                               "metadata": md_dict or {}, "execution_count": self.shell.execution_count})

        def finish_displayhook(self):
            pass

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            self.shell.record({"output_type": "display_data", "data": data, "metadata": metadata or {}})

        def clear_output(self, wait=False):
            self.shell.outputs.clear()

    class Shell(InteractiveShell):
        outputs: list = []
        sizes = {"stream": 0, "display": 0}

        def record(self, output):
            if output["output_type"] in ("execute_result", "display_data"):
                size = sum(len(str(v)) for v in output["data"].values())
                if self.sizes["display"] + size > DISPLAY_LIMIT:
                    return
                self.sizes["display"] += size
            self.outputs.append(output)

        def enable_gui(self, gui=None):  # inline figures need no event loop
            pass

        def _showtraceback(self, etype, evalue, stb):
            self.outputs.append({"output_type": "error", "ename": getattr(etype, "__name__", str(etype)),
                                 "evalue": str(evalue), "traceback": list(stb)[-30:]})

    from traitlets.config import Config
    config = Config()
    config.HistoryManager.enabled = False  # no history thread, no database: fork-safe
    shell = Shell.instance(config=config, displayhook_class=Hook, display_pub_class=Publisher, colors="NoColor")
    shell.enable_matplotlib("inline")
    return shell


class _Stream:
    """sys.stdout / sys.stderr for a cell: appends to the shell's outputs, up to a limit."""

    def __init__(self, shell, name):
        self.shell, self.name = shell, name
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text):
        text = str(text)
        room = STREAM_LIMIT - self.shell.sizes["stream"]
        if room <= 0:
            return len(text)
        if len(text) > room:
            text = text[:room] + "\n[output truncated: the cell printed too much]\n"
        self.shell.sizes["stream"] += len(text)
        outputs = self.shell.outputs
        if outputs and outputs[-1]["output_type"] == "stream" and outputs[-1]["name"] == self.name:
            outputs[-1]["text"] += text
        else:
            outputs.append({"output_type": "stream", "name": self.name, "text": text})
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False

    def fileno(self):
        raise OSError("no file descriptor while grading")


def _begin_cell(shell):
    shell.outputs = []
    shell.sizes = {"stream": 0, "display": 0}
    sys.stdout, sys.stderr = _Stream(shell, "stdout"), _Stream(shell, "stderr")


def _end_cell(shell):
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return shell.outputs


def _interruptible(on: bool) -> None:
    """SIGINT (the grader's time limit) interrupts the notebook's code, never the kernel's
    own reading and writing of messages, which would leave the stream half read."""
    signal.signal(signal.SIGINT, signal.default_int_handler if on else signal.SIG_IGN)


def _execute(shell, source: str) -> dict:
    _begin_cell(shell)
    try:
        shell.execution_count += 1
        _interruptible(True)
        shell.run_cell(source, store_history=False)
    except BaseException as exc:  # an exception IPython itself let through (SystemExit inside a hook...)
        shell.outputs.append({"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc),
                              "traceback": []})
    finally:
        _interruptible(False)
        outputs = _end_cell(shell)
    return {"op": "executed", "outputs": outputs, "execution_count": shell.execution_count}


_DEFINED: dict[int, tuple] = {}  # the checks' code the grader shipped: id -> (call_student, run, forbidden)


def _define(request: dict) -> dict:
    """Load a check's code, shipped by value. Its copy of ``bn_exercises.execution`` gets the
    libraries' code as :func:`_preload` found it, before any notebook ran: left to itself it
    would list it anew at its first call, after the learner's cells had run (a module the
    notebook made, claiming a library's file, would then count as a library's), and again
    for every check of every notebook."""
    import cloudpickle

    from bn_exercises import execution
    try:
        shipped = cloudpickle.loads(request["payload"])
    except Exception as exc:  # the check's code does not load here: a course bug, reported as one
        return {"op": "defined", "error": f"{type(exc).__name__}: {exc}"[:500]}
    shipped[0].__globals__["_TRUSTED"] = execution._TRUSTED  # shipped = (call_student, run, forbidden)
    _DEFINED[request["id"]] = shipped
    return {"op": "defined"}


def _call(shell, request: dict) -> dict:
    """Run a check's ``run`` (shipped before, by :func:`_define`) on the notebook's object
    ``request['name']``, with the case in ``request['payload']``."""
    import cloudpickle
    from dataclasses import asdict

    _begin_cell(shell)
    try:
        call_student, run, forbidden = _DEFINED[request["code"]]
        case = cloudpickle.loads(request["payload"])
        name = request["name"]
        if name not in shell.user_ns:
            reply = {"error": {"type": "NameError", "message": f"name {name!r} is not defined: run the cell that "
                               f"defines it, and keep the name the notebook gives it", "traceback": ""}}
        else:
            _interruptible(True)
            outcome = call_student(run, shell.user_ns[name], case, forbidden)
            _interruptible(False)
            reply = {"value": outcome.value, "error": asdict(outcome.error) if outcome.error else None,
                     "notes": outcome.notes, "mutated": outcome.mutated,
                     "reference_used": outcome.reference_used,
                     "instrumentation_off": outcome.instrumentation_off}
    except BaseException as exc:  # the learner's code broke out of the observation (or the check did)
        reply = {"error": {"type": type(exc).__name__, "message": str(exc)[:500], "traceback": ""}}
    finally:
        _interruptible(False)
        printed = "".join(o.get("text", "") for o in _end_cell(shell) if o["output_type"] == "stream")
    return {"op": "called", "outcome": reply, "printed": printed}


# --------------------------------------------------------------------------
# One notebook: the child

def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def _virtual_memory() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _notebook_child(sock: socket.socket, shell, request: dict) -> None:
    """Set this process's limits, then serve the grader's requests until it says bye."""
    os.setsid()
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # its own /proc files stay readable
    with contextlib.suppress(OSError):  # out of memory in the sandbox's cgroup: the notebook goes, not the kernel
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    limits = request["limits"]
    _limit(resource.RLIMIT_AS, _virtual_memory() + int(limits["memory"]))
    _limit(resource.RLIMIT_CPU, int(limits["cpu"]))
    if limits["processes"]:
        _limit(resource.RLIMIT_NPROC, int(limits["processes"]))
    _limit(resource.RLIMIT_FSIZE, int(limits["file_size"]))
    _limit(resource.RLIMIT_CORE, 0)
    for folder in ("work", "home"):
        os.makedirs(os.path.join(SCRATCH, folder), exist_ok=True)
    os.chdir(os.path.join(SCRATCH, "work"))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # raw writes to the file descriptors go nowhere
        os.dup2(null, fd)
    _interruptible(False)
    protocol.send(sock, {"op": "ready"})
    while True:
        message = protocol.recv(sock)
        if message["op"] == "exec":
            reply = _execute(shell, message["source"])
        elif message["op"] == "define":
            reply = _define(message)
        elif message["op"] == "call":
            reply = _call(shell, message)
        else:
            os._exit(0)
        protocol.send(sock, reply)


# --------------------------------------------------------------------------
# The zygote

def _preload():
    """Import what the notebooks import, once, single-threaded."""
    import numpy  # noqa: F401
    import torch
    torch.set_num_threads(1)
    import torch.nn.functional  # noqa: F401
    import scipy.linalg  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import cloudpickle  # noqa: F401
    import bn_exercises.checking  # noqa: F401 - what the notebooks' first cell imports
    from bn_exercises.execution import trust_loaded_code
    shell = _make_shell()
    trust_loaded_code()  # code loaded now is the libraries': later code is fingerprinted wherever it claims to be from
    return shell


def _identities() -> list[tuple[int, int]]:
    """(device, inode) of the folders Python imports from: if a notebook managed to move or
    replace one (they are read-only binds, but may sit below the writable /tmp), the next
    notebook must not import from it."""
    import bncourse
    folders = [sys.prefix, sys.base_prefix, os.path.dirname(bncourse.__file__)]
    return [(info.st_dev, info.st_ino) for info in map(os.stat, folders)]


def _others() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]


def _wipe(top: str) -> None:
    """Delete everything below ``top`` that lives on its file system, even what the notebook
    made unreadable or unwritable; leave mount points (the read-only binds of Python and
    this package, when they sit below ``/tmp``) alone."""
    device, stack, folders = os.stat(top).st_dev, [os.path.join(top, n) for n in os.listdir(top)], []
    while stack:
        path = stack.pop()
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if info.st_dev != device:
            continue
        if stat.S_ISDIR(info.st_mode):
            folders.append(path)
            with contextlib.suppress(OSError):
                os.chmod(path, 0o700)
            with contextlib.suppress(OSError):
                stack.extend(os.path.join(path, name) for name in os.listdir(path))
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(path)


_IPC_RMID = 0
_IPC_OBJECTS = {"shm": "shmctl", "sem": "semctl", "msg": "msgctl"}  # /proc/sysvipc/<kind> -> its control call


def _wipe_ipc() -> int:
    """Remove every System V shared-memory segment, semaphore set and message queue of the
    sandbox's IPC namespace (they outlive the processes that made them); returns how many."""
    libc, removed = ctypes.CDLL(None, use_errno=True), 0
    for kind, call in _IPC_OBJECTS.items():
        try:
            lines = open(f"/proc/sysvipc/{kind}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            ident = int(line.split()[1])
            args = (ident, 0, _IPC_RMID) if kind == "sem" else (ident, _IPC_RMID, None)
            removed += getattr(libc, call)(*args) == 0
    return removed


def _clean(child: int | None) -> dict:
    """End the notebook: kill its processes, reap the child, wipe what it could leave behind.

    In the sandbox's own PID namespace that is every process but this one and PID 1
    (``kill(-1)`` reaches nothing outside it); without one, only the child's session.
    Then the scratch folder, ``/dev/shm``, the POSIX message queues and the System V
    IPC objects are emptied (processes are gone; these are not, unless removed)."""
    status = None
    for _ in range(500):
        try:
            if ISOLATED:
                os.kill(-1, signal.SIGKILL)  # every process we may signal, except ourselves and PID 1
            elif child:
                os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                status = code
        if (child is None or status is not None) and not (ISOLATED and _others()):
            break
        time.sleep(0.01)
    _wipe(SCRATCH)
    if ISOLATED:
        for folder in ("/dev/shm", "/dev/mqueue"):
            if os.path.isdir(folder):
                _wipe(folder)
        _wipe_ipc()
    if status is None:
        return {"ended": "unknown"}
    if os.WIFSIGNALED(status):
        return {"ended": "signal", "signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"ended": "exit", "code": os.WEXITSTATUS(status)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--scratch", default="/tmp", help="the notebooks' writable folder, wiped after each")
    parser.add_argument("--isolated", action="store_true", help="in a PID namespace of our own (bubblewrap)")
    args = parser.parse_args(argv)
    global SCRATCH, ISOLATED
    SCRATCH, ISOLATED = args.scratch, args.isolated
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    sys.meta_path.insert(0, _StubFinder())
    shell = _preload()
    trusted = _identities()
    control = socket.socket(fileno=args.control_fd)
    protocol.send(control, {"op": "ready"})
    child = None
    while True:
        message = protocol.recv(control)
        op = message["op"]
        if op == "start":
            ours, theirs = socket.socketpair()
            child = os.fork()
            if child == 0:
                control.close()
                ours.close()
                try:
                    _notebook_child(theirs, shell, message)
                finally:
                    os._exit(0)
            theirs.close()
            protocol.send(control, {"op": "started"})
            socket.send_fds(control, [b"F"], [ours.fileno()])
            ours.close()
        elif op == "interrupt" and child:
            try:
                os.kill(child, signal.SIGINT)
            except ProcessLookupError:
                pass
            protocol.send(control, {"op": "interrupted"})
        elif op == "stop":
            ended = _clean(child)
            healthy = _identities() == trusted
            protocol.send(control, {"op": "stopped", "healthy": healthy, **ended})
            child = None
            if not healthy:  # the notebook moved what later notebooks import from: start afresh
                return
        elif op == "exit":
            _clean(child)
            return


if __name__ == "__main__":
    main()
