"""The learner package holds no answer, and is all a learner needs.

- The recorded answers are up to date with the reference and the catalogue, and
  hold the visible cases only.
- The wheel the site publishes is small and defines no function or class whose
  code is a reference implementation's or a catalogue entry's (the fingerprints
  the grader uses), and none of the code that draws hidden cases.
- In a fresh virtual environment with only the learner wheel (and the libraries
  it needs), ``import bn_reference`` fails, every released notebook installs the
  wheel from the site with its first cell, the blank release fails every check
  as "still the stub", the model answers pass every visible check, and every
  catalogue entry of every chapter is named.
- A damaged or stale install says so and what to do; it never passes.

The wheel comes from the built site (`make html`, which `make test` runs first).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import cloudpickle
import nbformat
import pytest

import bn_exercises
import bn_reference
from bn_exercises import checking
from bn_exercises.execution import Forbidden, fingerprint
from bn_reference.grading import record
from bncourse.benchmark import answered
from bncourse.release import wheel_name

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
WHEEL = SITE / "_static" / wheel_name()
TOPICS = record.topics()
SLUGS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())


def _topic(slug: str) -> str:
    return slug.split("_", 1)[1]


# --- the recorded answers ------------------------------------------------------------

@pytest.mark.parametrize("topic", TOPICS)
def test_the_recorded_answers_are_up_to_date(topic):
    committed = (record.ANSWERS / f"{topic}.npz").read_bytes()
    assert committed == record.recorded_bytes(topic), \
        f"bn_exercises/answers/{topic}.npz is stale: run `make exercises` and commit the result"


def _digest(data) -> str:
    from bn_reference.grading import _digest_value
    return _digest_value(data) or repr(sorted(data))


@pytest.mark.parametrize("topic", TOPICS)
def test_the_recorded_answers_hold_the_visible_cases_and_no_hidden_one(topic):
    recorded = checking.read_answers(record.ANSWERS / f"{topic}.npz")
    visible = {c["task"]: c for c in record.captured(topic)}
    assert set(recorded) == set(visible)
    for task, call in visible.items():
        assert [c.case.label for c in recorded[task].cases] == [c.label for c in call["cases"]]
        assert len(recorded[task].catalogue) == len(call["catalogue"])
    grading = importlib.import_module(f"bn_reference.grading.{topic}")
    calls = []
    token = record._recording.set(calls)
    try:
        for name in grading.__all__:
            if name.startswith("check_"):
                getattr(grading, name)(None, hidden=True)
    finally:
        record._recording.reset(token)
    hidden = {_digest(dict(c.data)) for call in calls for c in call["cases"]}
    shipped = {_digest(dict(c.case.data)) for task in recorded.values() for c in task.cases}
    assert not hidden & shipped


# --- the wheel -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel() -> Path:
    if not WHEEL.is_file():
        pytest.fail(f"{WHEEL} is missing: build the site first with `make html`.")
    return WHEEL


def test_the_wheel_is_small_and_holds_the_learner_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MB, {len(names)} files")
    assert wheel.stat().st_size < 5 * 2**20
    assert {n.split("/")[0] for n in names} == {"bn_exercises", f"bn_exercises-{bn_exercises.__version__}.dist-info"}
    assert {f"bn_exercises/answers/{t}.npz" for t in TOPICS} <= set(names)


def _course_code() -> Forbidden:
    """Every function and class of the reference modules and every catalogue entry."""
    objects = []
    for module_name in (f"bn_reference.{p.stem}" for p in Path(bn_reference.__file__).parent.glob("*.py")
                        if p.stem != "__init__"):
        module = importlib.import_module(module_name)
        objects += [o for o in vars(module).values()
                    if (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == module.__name__]
        grading = importlib.import_module(f"bn_reference.grading.{module_name.rpartition('.')[2]}")
        objects += [m.impl for entries in grading.CATALOGUE.values() for m in entries]
    return Forbidden.of(*objects)


def test_no_code_in_the_wheel_is_a_reference_or_a_catalogue_entry(wheel):
    """Compiled from the wheel's own files, no code object has the fingerprint of a
    reference function or class, or of a catalogue entry (the grader's measure of a
    copy), and none draws hidden cases."""
    forbidden = _course_code()
    assert len(forbidden.fingerprints) > 100
    found, sources = [], 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.endswith(".py"):
                continue
            source = archive.read(name).decode()
            sources += 1
            assert not re.search(r"\b(hidden_seed|case_rng|BN_GRADING_SECRET|bn_reference\.grading\.\w+ import)\b",
                                 source), name
            stack = [compile(source, name, "exec")]
            while stack:
                code = stack.pop()
                fp = fingerprint(code)
                if fp in forbidden.fingerprints:
                    found.append(f"{name}: {code.co_name} is {forbidden.fingerprints[fp]}")
                stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    assert sources >= len(TOPICS) + 3
    assert not found


# --- a damaged install ---------------------------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "not a zip", "another format", "task missing", "other run"])
def test_a_damaged_or_stale_install_says_what_to_do_and_never_passes(damage, tmp_path, monkeypatch):
    import bn_exercises.feature_scaling as learner
    from alt_ch1_feature_scaling import mse_gradient

    original = record.ANSWERS / "feature_scaling.npz"
    broken = tmp_path / "feature_scaling.npz"
    if damage == "not a zip":
        broken.write_bytes(b"PK\x03\x04 damaged")
    elif damage == "another format":
        index, arrays = record.build("feature_scaling")
        record.write({**index, "format": 99}, arrays, broken)
    elif damage == "task missing":
        index, arrays = record.build("feature_scaling")
        del index["tasks"]["mse_gradient"]
        record.write(index, arrays, broken)
    elif damage == "other run":
        index, arrays = record.build("feature_scaling")
        index["tasks"]["mse_gradient"]["run"] = "bn_exercises.feature_scaling:_run_gd"
        record.write(index, arrays, broken)
    assert original.is_file()
    monkeypatch.setattr(checking, "answers_path", lambda topic: broken)
    checking._answers.cache_clear()
    try:
        with pytest.raises(checking.CheckFailed) as failure:
            learner.check_mse_gradient(mse_gradient)
    finally:
        checking._answers.cache_clear()
    assert failure.value.misconception == checking.ANSWERS_MISSING
    assert "pip uninstall -y bn_exercises" in str(failure.value) and "first code cell" in str(failure.value)


# --- a fresh environment with the learner wheel only -----------------------------------

def _pins(*names: str) -> list[str]:
    """The course's pinned requirements for these distributions."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [line.strip() for line in lines if re.match(rf"^({'|'.join(map(re.escape, names))})==", line.strip())]
    assert len(pins) == len(names), pins
    return pins


@pytest.fixture(scope="module")
def site_server():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def learner_venv(tmp_path_factory, wheel):
    """A new virtual environment with the libraries the notebooks use, and not the course."""
    folder = tmp_path_factory.mktemp("learner")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    libraries = _pins("torch", "numpy", "scipy", "scikit-learn", "matplotlib", "cloudpickle")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *libraries,
                    "ipykernel", "nbclient", "nbformat"], check=True, capture_output=True, text=True)
    return python


_DRIVER = r'''
import json, sys, time
import nbformat
from nbclient import NotebookClient

notebook, output = sys.argv[1], sys.argv[2]
nb = nbformat.read(notebook, as_version=4)
started = time.perf_counter()
NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True).execute()
nb.metadata["seconds"] = time.perf_counter() - started
nbformat.write(nb, output)
'''

_NAMER = r'''
import importlib, io, json, sys, contextlib
import cloudpickle
from bn_exercises.checking import CheckFailed

entries = cloudpickle.load(open(sys.argv[1], "rb"))
named = []
for module, check, name, impl in entries:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            getattr(importlib.import_module(module), check)(impl)
        named.append("passed")
    except CheckFailed as failure:
        named.append(failure.misconception)
json.dump(named, sys.stdout)
'''


def _local_install(nb: nbformat.NotebookNode, site: str) -> nbformat.NotebookNode:
    """The notebook with its install cell pointed at the site served on 127.0.0.1."""
    nb = nbformat.from_dict(nb)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert f"/_static/{wheel_name()}" in first.source
    first.source = re.sub(r'"bn_exercises @ [^"]+"', f'"bn_exercises @ {site}/_static/{wheel_name()}"', first.source)
    return nb


def _run(python: Path, nb: nbformat.NotebookNode, folder: Path, name: str) -> nbformat.NotebookNode:
    source, result = folder / f"{name}.ipynb", folder / f"{name}.out.ipynb"
    nbformat.write(nb, source)
    driver = folder / "driver.py"
    driver.write_text(_DRIVER)
    subprocess.run([str(python), str(driver), str(source), str(result)], check=True, cwd=folder, timeout=1200,
                   capture_output=True, text=True)
    return nbformat.read(result, as_version=4)


def _grade_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")]


def _errors(cell) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]


@pytest.fixture(scope="module")
def fresh_runs(learner_venv, site_server, tmp_path_factory):
    """Every chapter's release (blank) and model answers, run in the fresh environment;
    the first notebook installs the wheel from the site."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for slug in SLUGS:
        release = nbformat.read(ROOT / "exercises" / slug / f"{slug}.ipynb", as_version=4)
        solution = nbformat.read(ROOT / "solutions" / slug / f"{slug}.ipynb", as_version=4)
        blank = _run(learner_venv, _local_install(release, site_server), folder, f"{slug}.blank")
        model = _run(learner_venv, _local_install(answered(release, solution), site_server), folder, f"{slug}.model")
        runs[slug] = (blank, model)
    return runs


def test_the_fresh_environment_has_no_bn_reference(learner_venv, fresh_runs, tmp_path):
    proc = subprocess.run([str(learner_venv), "-c", "import bn_reference"], capture_output=True, text=True,
                          cwd=tmp_path)  # not the repository, whose folder Python would import from
    assert proc.returncode != 0 and "No module named 'bn_reference'" in proc.stderr
    proc = subprocess.run([str(learner_venv), "-c", "import bn_exercises; print(bn_exercises.__file__)"],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "site-packages" in proc.stdout


def _cell_seconds(cell) -> float:
    """How long a cell ran, from the timings nbclient records."""
    from datetime import datetime

    timing = cell.metadata["execution"]
    started, ended = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                      for k in ("iopub.execute_input", "shell.execute_reply"))
    return (ended - started).total_seconds()


def test_the_first_cell_installs_the_learner_package_from_the_site(fresh_runs):
    """The first notebook run in the fresh environment installs the wheel from the site (served
    on 127.0.0.1 here); later ones find it installed."""
    first = [next(c for c in runs[0].cells if c.cell_type == "code") for runs in fresh_runs.values()]
    assert not any(_errors(cell) for cell in first)
    ran_pip = ["restart the kernel to use updated packages" in "".join(o.get("text", "") for o in cell.outputs)
               for cell in first]  # what %pip prints after it ran
    assert ran_pip == [True] + [False] * (len(first) - 1), ran_pip
    print(f"install cell: {_cell_seconds(first[0]):.1f} s when it installs, {_cell_seconds(first[1]):.1f} s after; "
          f"model answers ran in {({s: round(r[1].metadata['seconds'], 1) for s, r in fresh_runs.items()})} s")


@pytest.mark.parametrize("slug", SLUGS)
def test_the_blank_release_fails_every_check_as_the_stub(fresh_runs, slug):
    blank = fresh_runs[slug][0]
    for cell in _grade_cells(blank):
        errors = _errors(cell)
        assert errors and all("still raises NotImplementedError" in e for e in errors), (cell.source, errors)


@pytest.mark.parametrize("slug", SLUGS)
def test_the_model_answers_pass_every_visible_check(fresh_runs, slug):
    model = fresh_runs[slug][1]
    errors = [(c.metadata["nbgrader"].get("grade_id"), _errors(c)) for c in model.cells if c.cell_type == "code"]
    assert not [e for e in errors if e[1]]
    for cell in _grade_cells(model):
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert "cases agree with the reference" in text, cell.source


def test_every_catalogue_entry_is_named_without_the_grader(learner_venv, fresh_runs, tmp_path):
    """Every entry of every chapter, shipped by value into the fresh environment, is
    named by the learner package's visible check with its own name - the name the
    grader's live check gives it (each chapter's ``test_check_names_each_misconception``)."""
    import chapter_suite

    import copyreg

    cloudpickle.register_pickle_by_value(bn_reference)
    try:
        entries = []
        for slug in SLUGS:
            suite = next(v for v in vars(importlib.import_module(f"test_{slug}")).values()
                         if isinstance(v, type) and issubclass(v, chapter_suite.CatalogueSuite)
                         and v is not chapter_suite.CatalogueSuite)
            for task, catalogue in suite.catalogue.items():
                entries += [(f"bn_exercises.{_topic(slug)}", suite.checks[task].__name__, m.name, m.impl)
                            for m in catalogue]
        # modules of a subclass of ModuleType (torch.backends.mkldnn, ...), which pickle would
        # copy: shipped by name, as modules are
        for kind in {type(m) for m in list(sys.modules.values()) if isinstance(m, types.ModuleType)} - \
                {types.ModuleType}:
            copyreg.pickle(kind, lambda module: (importlib.import_module, (module.__name__,)))
        pickled = tmp_path / "entries.pkl"
        pickled.write_bytes(cloudpickle.dumps(entries))
    finally:
        cloudpickle.unregister_pickle_by_value(bn_reference)
    namer = tmp_path / "namer.py"
    namer.write_text(_NAMER)
    proc = subprocess.run([str(learner_venv), str(namer), str(pickled)], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = json.loads(proc.stdout)
    assert len(named) == len(entries)
    assert all(n == e[2] for n, e in zip(named, entries)), [(e[2], n) for n, e in zip(named, entries) if n != e[2]]
    print(f"{len(entries)} catalogue entries named in the fresh environment")


# --- the site -------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"^(`{3,})(?:\{code-cell\}\s*ipython3|python)[^\n]*\n(.*?)^\1", re.M | re.S)


def _page_code(page: Path) -> list[str]:
    """The Python of a page: its code cells and its python code blocks (cell options dropped)."""
    from IPython.core.inputtransformer2 import TransformerManager

    blocks = [m[2] for m in _CODE_BLOCK.finditer(page.read_text())]
    return [TransformerManager().transform_cell("\n".join(line for line in block.splitlines()
                                                          if not line.startswith(":"))) for block in blocks]


@pytest.mark.parametrize("page", sorted((ROOT / "book").glob("*.md")), ids=lambda p: p.name)
def test_no_page_shows_the_code_of_an_exercise(page):
    """Pages use the reference to draw their figures and show derivations and equations; none
    defines a function or class an exercise asks for, or holds a copy of the reference's or a
    catalogue entry's code (the grader's fingerprints)."""
    import ast

    tasks = {task for topic in TOPICS for task in importlib.import_module(f"bn_reference.grading.{topic}").CATALOGUE}
    forbidden = _course_code().fingerprints
    blocks = _page_code(page)
    assert blocks or not page.name.startswith("ch"), "no code found on a chapter page: the scanner is broken"
    for source in blocks:
        defined = {node.name for node in ast.walk(ast.parse(source))
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & tasks, (page.name, defined & tasks)
        stack = [compile(source, page.name, "exec")]
        while stack:
            code = stack.pop()
            assert fingerprint(code) not in forbidden, (page.name, code.co_name, forbidden.get(fingerprint(code)))
            stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
