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

import bn_exercises
from bncourse.release import wheel_name, wheel_url
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
                 f"tests/test_{slug}.py", f"bn_reference/{topic}.py", f"bn_reference/grading/{topic}.py",
                 f"bn_exercises/{topic}.py", f"bn_exercises/answers/{topic}.npz"]:
        assert (ROOT / path).is_file(), f"{path} is missing"
    assert f"file: book/{slug}" in (ROOT / "_toc.yml").read_text()
    importlib.import_module(f"bn_reference.grading.{topic}").CATALOGUE


@pytest.mark.parametrize("slug", SLUGS)
def test_exercise_installs_the_learner_package_from_the_configured_site(slug):
    """Colab has no course package: the notebook's first code cell installs the learner
    package, this version of it, from the site that _config.yml names - never bn_reference,
    which holds the answers."""
    nb = nbformat.read(ROOT / "exercises" / slug / f"{slug}.ipynb", as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert wheel_url(str(ROOT / "_config.yml")) in first_code.source
    assert f'version("bn_exercises") != "{bn_exercises.__version__}"' in first_code.source
    assert "bn_reference" not in nbformat.writes(nb)


def test_a_published_copy_only_sets_its_site_url(tmp_path):
    """A regenerated exercise installs the learner package from _config.yml's html.baseurl."""
    fork = (ROOT / "_config.yml").read_text().replace(CONFIG["html"]["baseurl"], "https://someone.github.io/a-copy/")
    course = make_course(tmp_path, [SLUGS[0]], book_config=fork)
    nb = nbformat.read(course / "exercises" / SLUGS[0] / f"{SLUGS[0]}.ipynb", as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert f"https://someone.github.io/a-copy/_static/{wheel_name()}" in first_code.source


@pytest.mark.parametrize("path", ["downloaded/x.zip", "submitted/s/ch1/a.ipynb", "autograded/s/a.ipynb",
                                  "feedback/s/a.html", "reports/ch1/grades.csv", "gradebook.db", "class.zip"])
def test_student_data_is_never_committed(path):
    """Every folder the class grader fills with student work is ignored by git."""
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_binder_installs_the_learner_package_not_the_answer_key():
    """Binder reads binder/ before the repository's root (whose requirements install
    bn_reference): its environment is the learner's."""
    from bncourse.release import binder_requirements

    committed = (ROOT / "binder" / "requirements.txt").read_text()
    assert committed == binder_requirements(ROOT), "binder/requirements.txt is stale: run `make learner-repo`"
    assert f"bn_exercises @ {wheel_url(str(ROOT / '_config.yml'))}" in committed
    requirements = [line.split("#")[0].strip() for line in committed.splitlines()]
    assert not [r for r in requirements if r.startswith(("bn_reference", "-e", "--editable", ".", "/"))], committed


def test_the_learner_repository_holds_the_release_and_nothing_of_the_key(tmp_path):
    from bncourse.release import write_learner_repository

    out = write_learner_repository(ROOT, tmp_path / "learner")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(["README.md", "binder/requirements.txt",
                            *(f"exercises/{slug}/{slug}.ipynb" for slug in SLUGS)])
    assert not any("BEGIN SOLUTION" in (out / f).read_text() or "hidden=True" in (out / f).read_text() for f in files)
