"""Sphinx extension for the course: the learner package and exercise links.

At the start of the build the learner package (``bn_exercises/``: the exercises'
visible checks, recorded answers and helpers, no reference code) is built into a
wheel and published with the site as ``_static/bn_exercises-<version>-py3-none-any.whl``,
the file the notebooks' first cell installs.

``{exercise} ch1_feature_scaling`` renders a box with the released exercise
notebook (``exercises/<slug>/<slug>.ipynb``) as a download, the learner package's
wheel, and links that open the notebook in Colab, Binder and a JupyterHub. The
launch buttons at the top of a chapter page (sphinx-book-theme's rocket menu) are
pointed at the same notebook: the theme would open the page's own MyST source,
which Colab cannot read and which is not what a learner wants to edit. All links
are built from the ``repository`` and ``launch_buttons`` settings of ``_config.yml``.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import bn_exercises

from docutils import nodes
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective


def launch_links(theme_options: dict, path: str) -> list[tuple[str, str]]:
    """(label, url) pairs opening repository file ``path`` in each configured service."""
    repo = theme_options.get("repository_url", "").rstrip("/")
    branch = theme_options.get("repository_branch", "main")
    buttons = theme_options.get("launch_buttons", {})
    ui = "lab/tree" if buttons.get("notebook_interface") == "jupyterlab" else "tree"
    org_repo = repo.split("github.com/")[-1]
    name = org_repo.split("/")[-1]
    links = []
    if buttons.get("colab_url"):
        links.append(("Colab", f"{buttons['colab_url'].rstrip('/')}/github/{org_repo}/blob/{branch}/{path}"))
    if buttons.get("binderhub_url"):
        links.append(("Binder", f"{buttons['binderhub_url'].rstrip('/')}/v2/gh/{org_repo}/{branch}?urlpath={ui}/{path}"))
    if buttons.get("jupyterhub_url"):
        pull = f"repo={quote(repo, safe='')}&branch={branch}&urlpath={ui}/{name}/{path}"
        links.append(("JupyterHub", f"{buttons['jupyterhub_url'].rstrip('/')}/hub/user-redirect/git-pull?{pull}"))
    return links


class ExerciseDirective(SphinxDirective):
    """Download and launch links for a chapter's exercise notebook."""

    required_arguments = 1

    def run(self):
        slug = self.arguments[0]
        path = f"exercises/{slug}/{slug}.ipynb"
        if not (Path(self.env.srcdir) / path).is_file():
            raise self.error(f"{path} does not exist: run `make exercises` to generate it from solutions/.")
        box = nodes.admonition(classes=["tip", "exercise-links"])
        box += nodes.title("", f"Exercise: {slug}")
        para = nodes.paragraph()
        para += nodes.Text("Download the notebook ")
        para += addnodes.download_reference(
            "", "", nodes.literal("", f"{slug}.ipynb"),
            reftarget=f"/{path}", refdoc=self.env.docname, refexplicit=True, reftype="download")
        para += nodes.Text(" or open it in ")
        links = launch_links(self.config.html_theme_options, path)
        for i, (label, url) in enumerate(links):
            para += nodes.reference("", label, refuri=url, classes=["launch-link"])
            para += nodes.Text(", " if i < len(links) - 2 else (" or " if i == len(links) - 2 else "."))
        box += para
        box += nodes.paragraph("", "Fill in the cells marked YOUR CODE HERE and run the test cells: "
                                   "a failing test names the mistake it recognises and how to fix it.")
        package = nodes.paragraph()
        package += nodes.Text("The tests come with the course's learner package, which the notebook's first cell "
                              "installs from this site (to install it yourself: pip install ")
        package += wheel_link(self.env.docname)
        package += nodes.Text("). It holds the checks and the answers recorded for the visible tests, "
                              "not the reference code.")
        box += package
        return [box]


class LearnerPackageDirective(SphinxDirective):
    """``{learner-package}``: a paragraph linking the learner package's wheel."""

    def run(self):
        para = nodes.paragraph()
        para += nodes.Text("The exercises' tests come with the course's learner package, ")
        para += wheel_link(self.env.docname)
        para += nodes.Text(" (pip installs it; each notebook's first cell does that for you): the checks, the "
                           "notebooks' helpers and the answers recorded for the visible tests - not the reference "
                           "code, which stays with the grader.")
        return [para]


WHEEL = f"bn_exercises-{bn_exercises.__version__}-py3-none-any.whl"


def build_learner_wheel(app) -> None:
    """Build the learner package's wheel into the site's ``_static`` folder (from a clean
    copy of its sources: nothing left over from an earlier build can slip in)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "bn_exercises"
        shutil.copytree(Path(app.srcdir) / "bn_exercises", source,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-w", folder, str(source)],
                              capture_output=True, text=True)
        wheel = Path(folder) / WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"building the learner package's wheel failed:\n{proc.stdout}{proc.stderr}")
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, static / WHEEL)


def wheel_link(docname: str) -> nodes.reference:
    """A link from page ``docname`` to the learner package's wheel."""
    depth = docname.count("/")
    return nodes.reference("", "", nodes.literal("", WHEEL), refuri="../" * depth + f"_static/{WHEEL}")


def exercise_for(srcdir: str, pagename: str) -> str | None:
    """The exercise path of chapter page ``book/<slug>``, if that exercise exists."""
    slug = pagename.rpartition("/")[2]
    path = f"exercises/{slug}/{slug}.ipynb"
    return path if (Path(srcdir) / path).is_file() else None


def point_launch_buttons_at_exercise(app, pagename, templatename, context, doctree):
    """Rewrite the theme's launch buttons of a chapter page to open its exercise."""
    path = exercise_for(app.srcdir, pagename)
    groups = [b for b in context.get("header_buttons", []) if b.get("label") == "launch-buttons"]
    if not path or not groups:
        return
    links = dict(launch_links(app.config.html_theme_options, path))
    for button in groups[0]["buttons"]:
        if button.get("text") in links:
            button["url"] = links[button["text"]]
            button["tooltip"] = f"Open this chapter's exercise in {button['text']}"


def setup(app):
    app.connect("builder-inited", build_learner_wheel)
    app.add_directive("exercise", ExerciseDirective)
    app.add_directive("learner-package", LearnerPackageDirective)
    # after sphinx-book-theme has added its launch buttons (priority 501)
    app.connect("html-page-context", point_launch_buttons_at_exercise, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
