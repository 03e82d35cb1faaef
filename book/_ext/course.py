"""Sphinx extension for the course: exercise links.

``{exercise} ch1_feature_scaling`` renders a box with the released exercise
notebook (``exercises/<slug>/<slug>.ipynb``) as a download, and links that open
it in Colab, Binder and a JupyterHub. The launch buttons at the top of a chapter
page (sphinx-book-theme's rocket menu) are pointed at the same notebook: the
theme would open the page's own MyST source, which Colab cannot read and which
is not what a learner wants to edit. All links are built from the ``repository``
and ``launch_buttons`` settings of ``_config.yml``.
"""

from pathlib import Path
from urllib.parse import quote

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
        return [box]


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
    app.add_directive("exercise", ExerciseDirective)
    # after sphinx-book-theme has added its launch buttons (priority 501)
    app.connect("html-page-context", point_launch_buttons_at_exercise, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
