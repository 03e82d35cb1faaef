"""An nbgrader preprocessor for ``generate_assignment``: the install cell follows ``_config.yml``.

Every exercise's first code cell installs the course package where it is missing
(on Colab, say) with ``%pip install "bn_reference @ git+<repository>"``. The
repository is the one ``_config.yml`` names (``repository.url``), the same that
the book's launch buttons open, so a fork sets it there and regenerates the
exercises (``make exercises``): nothing else to edit.
"""

import re
from pathlib import Path

import yaml
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Unicode

INSTALL = re.compile(r"(bn_reference @ git\+)[^\s\"']+")


def repository_url(book_config: str) -> str | None:
    """``repository.url`` of the book's ``_config.yml``, if there is one."""
    path = Path(book_config)
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("repository", {}).get("url")


class InstallFromRepository(NbGraderPreprocessor):
    """Points the notebooks' ``pip install ... git+URL`` at the configured repository."""

    book_config = Unicode("_config.yml", help="the Jupyter Book configuration that names the repository"
                          ).tag(config=True)

    def preprocess(self, nb, resources):
        url = repository_url(self.book_config)
        if url:
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.source = INSTALL.sub(lambda m: m[1] + url, cell.source)
        return nb, resources
