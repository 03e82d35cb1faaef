"""Recording the answers of the visible checks for the learner package.

For each chapter with a learner module (``bn_exercises/<topic>.py``) this calls
every visible check of ``bn_reference.grading.<topic>`` in recording mode, runs
the reference and every catalogue entry on each visible case, and writes the
cases, the reference's outputs and the entries' outputs (or that an entry raised)
to ``bn_exercises/answers/<topic>.npz``: JSON plus ``.npy`` arrays, nothing
pickled, byte-for-byte reproducible. Case data that are small models or loss
functions are stored as a recipe (a case helper of the learner module and its
arguments, such as a seed) and rebuilt on the learner's side. ``make exercises``
runs this; a test fails when a recording is stale.

    python -m bn_reference.grading.record [TOPIC ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import bn_exercises
from bn_exercises import codec
from bn_exercises.checking import FORMAT, _quietly, read_answers
from bn_exercises.execution import one_thread
from bn_reference.grading import _on_copy, _recording

ANSWERS = Path(bn_exercises.__file__).resolve().parent / "answers"
_DATE = (1980, 1, 1, 0, 0, 0)  # every zip entry's time: the file depends on its content only


def topics() -> list[str]:
    """The chapters whose learner module exists."""
    package = Path(bn_exercises.__file__).resolve().parent
    return sorted(p.stem for p in package.glob("*.py")
                  if (Path(__file__).resolve().parent / p.name).is_file() and p.stem != "__init__")


def captured(topic: str) -> list[dict]:
    """Each visible ``run_check`` call of the topic's checks: task, reference, cases, run,
    catalogue, tolerances."""
    grading = importlib.import_module(f"bn_reference.grading.{topic}")
    calls: list[dict] = []
    token = _recording.set(calls)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for name in grading.__all__:
                if name.startswith("check_"):
                    getattr(grading, name)(None)
    finally:
        _recording.reset(token)
    return calls


def build(topic: str) -> tuple[dict, list[np.ndarray]]:
    """The recording of one topic: its index (a JSON-able dict) and its arrays."""
    arrays: list[np.ndarray] = []
    shared: dict = {}
    refer = codec.referrer()

    def enc(value: Any) -> Any:
        return codec.encode(value, arrays, strict=True, refer=refer, shared=shared)[0]

    tasks: dict[str, dict] = {}
    with one_thread():
        for call in captured(topic):
            task, run, reference = call["task"], call["run"], call["reference"]
            if task in tasks:
                raise ValueError(f"{topic}: two visible checks record the task {task!r}")
            if not run.__module__.startswith("bn_exercises."):
                raise ValueError(f"{topic}: the run function of {task} must live in the learner package, "
                                 f"not in {run.__module__}")
            cases = []
            for case in call["cases"]:
                expected = _quietly(lambda: _on_copy(run, reference, case))
                wrong = []
                for m in call["catalogue"]:
                    try:
                        output = _quietly(lambda: _on_copy(run, m.impl, case))
                    except Exception:  # the judge skips an entry that raises on a case
                        wrong.append(None)
                        continue
                    wrong.append({"output": enc(output)})
                cases.append({"label": case.label, "data": enc(dict(case.data)), "mutable": list(case.mutable),
                              "expected": enc(expected), "wrong": wrong})
            tasks[task] = {"run": f"{run.__module__}:{run.__qualname__}", "rtol": call["rtol"],
                           "atol": call["atol"], "catalogue": [[m.name, m.fix] for m in call["catalogue"]],
                           "cases": cases}
    return {"format": FORMAT, "topic": topic, "tasks": tasks}, arrays


def write(index: dict, arrays: list[np.ndarray], target) -> None:
    """The recording as an ``.npz`` file (a path or a binary file object) whose bytes
    depend on its content only."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        def put(name: str, array: np.ndarray) -> None:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, codec.to_npy(array))

        put("index", np.array(codec.dumps(index)))
        for i, array in enumerate(arrays):
            put(f"a{i}", array)


def recorded_bytes(topic: str) -> bytes:
    """What ``answers/<topic>.npz`` must hold now."""
    buffer = io.BytesIO()
    write(*build(topic), buffer)
    return buffer.getvalue()


def record(topic: str) -> Path:
    path = ANSWERS / f"{topic}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(recorded_bytes(topic))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topics", nargs="*", help="default: every chapter with a learner module")
    args = parser.parse_args(argv)
    for topic in args.topics or topics():
        path = record(topic)
        tasks = read_answers(path)
        cases = sum(len(t.cases) for t in tasks.values())
        print(f"{path.relative_to(ANSWERS.parent.parent)}: {len(tasks)} tasks, {cases} visible cases, "
              f"{path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
