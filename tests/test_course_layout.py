"""One name per chapter, everywhere: each chapter's slug names its book page,
its solution and exercise notebooks, its test file and (without the chN_
prefix) its bn_reference module and grading module."""

import importlib
import re
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from nbgrader_cycle import make_course

ROOT = Path(__file__).resolve().parents[1]
SLUGS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def test_there_are_chapters():
    assert "ch1_feature_scaling" in SLUGS


@pytest.mark.parametrize("slug", SLUGS)
def test_one_name_everywhere(slug):
    assert re.fullmatch(r"ch\d_[a-z_]+", slug)
    topic = slug.split("_", 1)[1]
    for path in [f"book/{slug}.md", f"solutions/{slug}/{slug}.ipynb", f"exercises/{slug}/{slug}.ipynb",
                 f"tests/test_{slug}.py", f"bn_reference/{topic}.py", f"bn_reference/grading/{topic}.py"]:
        assert (ROOT / path).is_file(), f"{path} is missing"
    assert f"file: book/{slug}" in (ROOT / "_toc.yml").read_text()
    importlib.import_module(f"bn_reference.grading.{topic}").CATALOGUE


@pytest.mark.parametrize("slug", SLUGS)
def test_exercise_installs_the_course_package_from_the_configured_repository(slug):
    """Colab has no bn_reference: the notebook's first code cell installs it from the
    repository that _config.yml (and so every launch link) names."""
    nb = nbformat.read(ROOT / "exercises" / slug / f"{slug}.ipynb", as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert f"git+{CONFIG['repository']['url']}" in first_code.source



def test_a_fork_only_sets_its_repository_url(tmp_path):
    """A regenerated exercise installs the course package from _config.yml's repository.url."""
    fork = (ROOT / "_config.yml").read_text().replace(CONFIG["repository"]["url"], "https://github.com/someone/a-fork")
    course = make_course(tmp_path, [SLUGS[0]], book_config=fork)
    nb = nbformat.read(course / "exercises" / SLUGS[0] / f"{SLUGS[0]}.ipynb", as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "git+https://github.com/someone/a-fork" in first_code.source


@pytest.mark.parametrize("path", ["downloaded/x.zip", "submitted/s/ch1/a.ipynb", "autograded/s/a.ipynb",
                                  "feedback/s/a.html", "reports/ch1/grades.csv", "gradebook.db", "class.zip"])
def test_student_data_is_never_committed(path):
    """Every folder the class grader fills with student work is ignored by git."""
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
