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
