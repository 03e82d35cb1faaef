"""Every number in a page's prose comes from code, or says why it need not.

A number that a page's prose states about what its code computed must be glued
from that code (``{glue:text}`name```) so that it cannot drift from what ran.
What the scanner accepts without glue:

- numbers inside math, code, glue and citation roles, links, and the page's code cells;
- references to a paper's parts and years: "Sec. 4.2.1", "Fig. 1", "Table 1",
  "Algorithm 2", "Eq. 3", "Chapter 5", "arXiv 1502.03167", "2015";
- numbered list markers and headings, and the constants 0 and 1;
- the phrases the page lists in its front matter under ``prose_numbers`` - a
  paper's own figures, definitions and conventions ("momentum = 0.1"), each a
  phrase that occurs in the page, with a YAML comment saying why it is typed.

Everything else fails, quoted with its line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

BOOK = Path(__file__).resolve().parents[1] / "book"
PAGES = sorted(p.name for p in BOOK.glob("ch*_*.md")) + ["instructors.md"]

NUMBER = re.compile(r"(?<![\w.\-/#])[-+\u2212]?\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w/])")
REFERENCE = re.compile(r"(?:Secs?\.|Sections?|Figs?\.|Figures?|Tables?|Algorithms?|Alg\.|Eqs?\.|Equations?|"
                       r"Chapters?|Ch\.|Appendix|arXiv|panels?|issue|nbgrader issue)\s*$", re.I)
YEAR = re.compile(r"^(19[5-9]\d|20[0-2]\d)[a-z]?$")


def _front_matter(text: str) -> tuple[dict, str]:
    if not text.startswith("---\n"):
        return {}, text
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}, text[end + 5:]


_BLOCKS = [
    re.compile(r"^(`{3,}|~{3,})[^\n]*\n.*?^\1[ \t]*$", re.M | re.S),   # code cells, directives, fenced code
    re.compile(r"^:{3,}[^\n]*\n.*?^:{3,}[ \t]*$", re.M | re.S),         # colon fences
    re.compile(r"\$\$.*?\$\$", re.S),                                    # display math
    re.compile(r"(?<!\\)\$[^$\n]+?(?<!\\)\$"),                           # inline math
    re.compile(r"\{[\w:-]+\}`[^`]*`"),                                   # roles: {glue:text}`x`, {cite}`y`, ...
    re.compile(r"`[^`\n]*`"),                                            # inline code
    re.compile(r"\]\([^)]*\)"),                                          # link targets
    re.compile(r"<!--.*?-->", re.S),                                     # comments
    re.compile(r"^\(.*\)=\s*$", re.M),                                   # labels
    re.compile(r"^\+\+\+.*$", re.M),                                     # cell separators
]


def prose(text: str) -> str:
    """The page's prose, with everything the scanner need not look at blanked out
    (line breaks are kept, so that line numbers stay right)."""
    for pattern in _BLOCKS:
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)
    return text


def typed_numbers(page: str) -> list[str]:
    """``line N: ...`` for every number typed in the page's prose that is neither glued
    nor accounted for."""
    meta, body = _front_matter((BOOK / page).read_text())
    offset = (BOOK / page).read_text().count("\n", 0, len((BOOK / page).read_text()) - len(body))
    text = prose(body)
    for phrase in meta.get("prose_numbers") or []:
        text = text.replace(phrase, " " * len(phrase))
    found = []
    for number, line in ((m, text.count("\n", 0, m.start())) for m in NUMBER.finditer(text)):
        before = text[max(0, number.start() - 30):number.start()]
        start_of_line = text.rfind("\n", 0, number.start()) + 1
        if REFERENCE.search(before) or YEAR.match(number[0]) or number[0] in ("0", "1"):
            continue
        if text[start_of_line:start_of_line + 1] == "#":
            continue  # a heading
        if re.fullmatch(r"[ \t>]*(?:[-*+] )?", text[start_of_line:number.start()]) and \
                re.match(r"[.)] ", text[number.end():number.end() + 2]):
            continue  # a numbered list's marker
        source_line = body.splitlines()[line]
        found.append(f"line {line + offset + 1}: {number[0]!r} in: {source_line.strip()[:160]}")
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_number_in_the_prose_is_glued_or_accounted_for(page):
    found = typed_numbers(page)
    assert not found, (f"{page}: numbers typed in the prose - glue them from the code that computed them, or, "
                       f"for a paper's figure or a definition, list the phrase under prose_numbers in the "
                       f"page's front matter:\n" + "\n".join(found))


@pytest.mark.parametrize("page", PAGES)
def test_every_accounted_phrase_is_still_on_the_page(page):
    meta, body = _front_matter((BOOK / page).read_text())
    text = prose(body)
    stale = [p for p in meta.get("prose_numbers") or [] if p not in text]
    assert not stale, f"{page}: prose_numbers lists phrases its prose no longer has: {stale}"


def test_the_scanner_finds_a_typed_number_and_accepts_the_others():
    text = ("The network reached 0.93 accuracy (Sec. 4.2, Fig. 2) in 2015 {glue:text}`acc:.3f` and "
            "$\\epsilon = 10^{-5}$ `lr = 0.1`;\n1. first item\n")
    page = BOOK / "_scanner_probe.md"
    try:
        page.write_text("---\nprose_numbers: ['momentum 0.1']\n---\n# 2. A heading\n" + text + "momentum 0.1, 42\n")
        found = typed_numbers(page.name)
    finally:
        page.unlink()
    assert [f.split("'")[1] for f in found] == ["0.93", "42"]
