"""An nbgrader preprocessor for ``generate_assignment``: the install cell follows the course.

Every exercise's first code cell installs the learner package (``bn_exercises``:
the visible checks and the notebook's helpers, no answers) where it is missing or
another version, from the wheel that ``make html`` builds into the site:
``<html.baseurl>/_static/bn_exercises-<version>-py3-none-any.whl``. The site
address is ``_config.yml``'s ``html.baseurl`` and the version is the learner
package's, so a course published elsewhere sets ``html.baseurl`` and regenerates
the exercises (``make exercises``): nothing else to edit.
"""

import re
from pathlib import Path

import yaml
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Unicode

import bn_exercises

VERSION = re.compile(r'(version\("bn_exercises"\) != ")[^"]*(")')
WHEEL = re.compile(r'("bn_exercises @ )[^"]*(")')


def wheel_name(version: str = bn_exercises.__version__) -> str:
    """The file name of the learner package's wheel."""
    return f"bn_exercises-{version}-py3-none-any.whl"


def site_url(book_config: str) -> str | None:
    """``html.baseurl`` of the book's ``_config.yml``, if there is one."""
    path = Path(book_config)
    if not path.is_file():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get("html") or {}).get("baseurl")


def wheel_url(book_config: str) -> str | None:
    """Where the published site serves the learner package's wheel."""
    base = site_url(book_config)
    return f"{base.rstrip('/')}/_static/{wheel_name()}" if base else None


class InstallLearnerPackage(NbGraderPreprocessor):
    """Points the notebooks' install cell at this version of the learner package on the site."""

    book_config = Unicode("_config.yml", help="the Jupyter Book configuration that names the site"
                          ).tag(config=True)

    def preprocess(self, nb, resources):
        url = wheel_url(self.book_config)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = VERSION.sub(lambda m: m[1] + bn_exercises.__version__ + m[2], cell.source)
                if url:
                    cell.source = WHEEL.sub(lambda m: m[1] + url + m[2], cell.source)
        return nb, resources


# --------------------------------------------------------------------------
# What Binder and a learner repository hold

_LIBRARIES = ("numpy", "scipy", "scikit-learn", "matplotlib")


def binder_requirements(root: Path) -> str:
    """``binder/requirements.txt``: the libraries the notebooks use, pinned as the course
    pins them (PyTorch's CPU build from its own index), and the learner package from the
    site - never ``bn_reference``. Binder reads ``binder/`` before the repository's root."""
    pins = {line.split("==")[0]: line.strip() for line in (root / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    url = wheel_url(str(root / "_config.yml"))
    return "\n".join([
        "# Binder's environment for the exercises: the notebooks' libraries and the course's learner",
        "# package (checks and recorded answers, no reference code). Written by `make learner-repo`.",
        "--extra-index-url https://download.pytorch.org/whl/cpu",
        pins["torch"],
        *(pins[name] for name in _LIBRARIES),
        f"bn_exercises @ {url}",
        "",
    ])


def write_learner_repository(root: Path, out: Path) -> Path:
    """The public repository a graded class's launch buttons open: the released notebooks,
    Binder's environment files and a README - nothing of solutions/ or bn_reference."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    for notebook in sorted((root / "exercises").glob("*/*.ipynb")):
        target = out / notebook.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(notebook, target)
    (out / "binder").mkdir(parents=True)
    (out / "binder" / "requirements.txt").write_text(binder_requirements(root))
    (out / "README.md").write_text(
        "# Exercises of *Batch Normalization, from feature scaling to its limits*\n\n"
        f"The course's site is {site_url(str(root / '_config.yml'))}. Each chapter's exercise notebook is in "
        "`exercises/<chapter>/`; open it from the site's launch buttons (Colab, Binder, JupyterHub) or download "
        "it. Its first cell installs the course's learner package from the site.\n")
    return out


def main(argv=None) -> None:
    """``python -m bncourse.release OUT``: write the learner repository (``make learner-repo``)."""
    import argparse

    parser = argparse.ArgumentParser(description=write_learner_repository.__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    print(f"learner repository: {write_learner_repository(root, args.out)}")


if __name__ == "__main__":
    main()
