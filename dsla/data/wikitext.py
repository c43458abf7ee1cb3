"""MediaWiki markup to plain text, with mwparserfromhell plus a regex safety net.

``clean_wikitext`` keeps prose, list items and section headings (each heading on its own
line, without ``=``), and removes templates, tables, references, comments, HTML tags, files,
categories, interlanguage links and the trailing apparatus sections (References, External
links, ...). The output never contains ``[[``, ``]]``, ``{{``, ``}}``, ``{|``, ``<tag>`` or
``<!--``; markup the parser cannot balance is deleted rather than left behind.
"""

from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import Comment, ExternalLink, Heading, Tag, Template, Wikilink
from mwparserfromhell.wikicode import Wikicode

# Tags whose content is not prose: references, tables, media, maths, galleries, code.
DROP_TAGS = frozenset(
    "ref references table gallery math chem timeline imagemap score graph syntaxhighlight "
    "source templatedata mapframe maplink inputbox categorytree hiero ce".split()
)
# Sections (any level; their subsections go too) that hold citations and links, not prose.
DROP_SECTIONS = frozenset(
    {
        "references", "notes", "footnotes", "citations", "sources", "bibliography",
        "further reading", "external links", "external link", "see also", "gallery",
        "notes and references", "references and notes", "works cited",
    }
)
# Link namespaces whose target is not text: media, categories. Interlanguage links are
# recognised by a language-code prefix.
DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]{2,8})*$")

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_HEADING = re.compile(r"^(={1,6})[ \t]*([^\n]+?)[ \t]*\1[ \t]*$", re.M)

_SAFETY_NET = [
    (re.compile(r"<!--.*?(-->|$)", re.S), ""),  # comments, closed or not
    (re.compile(r"\{\|.*?(\|\}|$)", re.S), ""),  # tables the parser could not close
    (re.compile(r"<ref\b[^>]*(?<!/)>.*?(?:</ref\s*>|(?=\n)|\Z)", re.I | re.S), ""),  # unclosed refs
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # innermost leftover templates
    (re.compile(r"</?[A-Za-z][^<>]*>"), ""),  # stray HTML tags
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]"), r"\1"),  # leftover links -> text
    (re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}"), ""),  # unbalanced brackets
    (re.compile(r"__[A-Z]+__"), ""),  # magic words like __NOTOC__
    (re.compile(r"'{2,}"), ""),  # bold/italic quotes the parser left
]


def _link_is_dropped(link: Wikilink) -> bool:
    title = str(link.title).strip().lstrip(":")
    if ":" not in title:
        return False
    prefix = title.split(":", 1)[0].strip().lower()
    if prefix in DROP_LINK_NAMESPACES:
        return True
    return link.text is None and bool(_LANG_PREFIX.match(prefix))


def _is_dropped(node) -> bool:
    if isinstance(node, (Template, Comment)):
        return True
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in DROP_TAGS or node.wiki_markup == "{|"
    return isinstance(node, Wikilink) and _link_is_dropped(node)


def _prune(code: Wikicode) -> None:
    """Remove dropped nodes from ``code`` and, recursively, from the text-bearing children.

    Rebuilding each node list is linear; ``Wikicode.remove`` searches the tree per call and is
    quadratic on long articles.
    """
    kept = []
    for node in code.nodes:
        if _is_dropped(node):
            continue
        if isinstance(node, Tag):
            children = [node.contents]
        elif isinstance(node, Wikilink):
            children = [node.title, node.text]
        elif isinstance(node, Heading):
            children = [node.title]
        elif isinstance(node, ExternalLink):
            children = [node.title]
        else:
            children = []
        for child in children:
            if child is not None:
                _prune(child)
        kept.append(node)
    code.nodes = kept


def _tidy(text: str) -> str:
    """Apply the regex safety net, normalise whitespace, drop lines with no letters or digits."""
    for _ in range(3):  # nested leftovers peel off one level per pass
        for pattern, repl in _SAFETY_NET:
            text = pattern.sub(repl, text)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)  # "(;, born ..." likewise
        line = re.sub(r"[^\S\n]+", " ", line).strip()
        line = re.sub(r" +([,.;:])", r"\1", line)
        lines.append(line if any(c.isalnum() for c in line) else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _clean_fragment(wikitext: str) -> str:
    code = mwparserfromhell.parse(wikitext)
    _prune(code)
    return _tidy(code.strip_code(normalize=True, collapse=True))


def split_sections(wikitext: str) -> list[tuple[int, str, str]]:
    """Split wikitext at heading lines: ``[(level, title, body)]``, the lead first as level 0.

    Headings are found by line, not by the parser, so one section's unbalanced markup (an
    unclosed ``<ref>`` or template) cannot swallow the headings after it.
    """
    wikitext = _COMMENT.sub("", wikitext)
    out, level, title, start = [], 0, "", 0
    for m in _HEADING.finditer(wikitext):
        out.append((level, title, wikitext[start : m.start()]))
        level, title, start = len(m.group(1)), m.group(2), m.end()
    out.append((level, title, wikitext[start:]))
    return out


def clean_wikitext(wikitext: str) -> str:
    """Return the plain text of one article's wikitext (see the module docstring).

    The article is cleaned section by section; a heading is kept as a plain line only when
    its section has text of its own or a kept subsection, and a dropped section (References,
    External links, ...) takes its subsections with it.
    """
    parts: list[tuple[int, str]] = []  # (heading level, or 0 for body text; text)
    drop_level = None
    for level, title, body in split_sections(wikitext):
        if level:
            title = _clean_fragment(title).replace("\n", " ")
            if drop_level is not None and level > drop_level:
                continue
            drop_level = level if title.lower() in DROP_SECTIONS else None
            if drop_level is not None:
                continue
            if title:
                parts.append((level, title))
        text = _clean_fragment(body)
        if text:
            parts.append((0, text))
    # Keep a heading only if body text follows before the next heading at its level or above.
    kept = []
    for i, (level, text) in enumerate(parts):
        if level:
            nxt = next((lv for lv, _ in parts[i + 1 :] if lv == 0 or lv <= level), None)
            if nxt != 0:
                continue
        kept.append(text)
    return "\n\n".join(kept)
