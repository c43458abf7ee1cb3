"""reStructuredText (Sphinx) to plain text: prose and code kept, markup dropped.

``clean_rst`` keeps, as text:

- prose paragraphs, list items, section titles (their ``====`` under/overlines go), table cells;
- code: literal blocks after ``::`` and the bodies of ``code-block``, ``console``, ``code``,
  ``parsed-literal`` and ``snippet`` directives, dedented, with their relative indentation and
  untouched by the inline cleaning below;
- the bodies of admonitions and other directives (``note``, ``warning``, ``seealso``, ...),
  dedented; the title of an ``admonition``/``rubric`` and the signature of an object description
  (``.. method:: Model.save(**kwargs)`` gives the line ``Model.save(**kwargs)``);
- ``versionadded`` / ``versionchanged`` / ``deprecated`` as Sphinx renders them
  ("New in Django 5.1.", "Changed in Django 5.1.", "Deprecated since version 5.1.").

It drops directive option lines (``:caption: x``), comments and link targets (``.. _x:``,
``.. _Python: https://...``), and whole ``toctree``, ``image``, ``figure``, ``raw``, ``index``,
``contents``, ``highlight``, ``currentmodule``, ``module``, ``include`` and substitution blocks.
Inline, in prose only: ``:role:`title <target>``` gives ``title``, ``:role:`~a.b.c``` gives ``c``,
other roles their text (``:ticket:`123``` gives ``#123``, ``:rfc:``/``:pep:`` their number with the
name); ````literal````, ```link <url>`_``, ``Python_``, ``*emphasis*`` and ``**strong**`` lose their
markup; footnote references (``[1]_``) go. Substitutions (``|version|``) stay as written. Runs of
blank lines, code blocks' included, become one blank line.
"""

from __future__ import annotations

import re
import textwrap

# Directives whose whole block is navigation or layout, not text.
DROP_DIRECTIVES = frozenset(
    "toctree image figure raw index contents highlight currentmodule module include default-role "
    "sectionauthor codeauthor meta tabularcolumns replace unicode".split()
)
# Directives whose body is code: kept verbatim (dedented).
CODE_DIRECTIVES = frozenset("code-block code sourcecode console parsed-literal snippet".split())
# Directives whose argument is a title to keep as a line of its own.
TITLE_DIRECTIVES = frozenset("admonition rubric topic sidebar".split())
# Directives whose argument is not text (admonitions without titles, tables' options).
NO_ARGUMENT = frozenset(
    "note warning tip hint important caution attention danger error seealso glossary table "
    "list-table csv-table".split()
)
VERSION_DIRECTIVES = {"versionadded": "New in Django {}.", "versionchanged": "Changed in Django {}.",
                      "deprecated": "Deprecated since version {}."}  # fmt: skip

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:\|[^|]+\|\s+)?([A-Za-z][\w:.-]*)::(?:\s+(.*))?$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # a comment, link target or footnote
_ANONYMOUS_TARGET = re.compile(r"^\s*__ \S")
_OPTION = re.compile(r"^\s*:[\w-][\w .-]*:(\s.*)?$")
_ADORNMENT = re.compile(r"^\s*([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*(?:\+[-=+]+\+|=+( +=+)+)\s*$")

_ROLE = re.compile(r"(?::[\w.+-]+)+:`([^`]+)`")
_NUMBERED_ROLES = {"ticket": "#{}", "rfc": "RFC {}", "pep": "PEP {}", "cve": "CVE-{}"}
_INLINE = [
    (re.compile(r"(?<![\w`|/])([A-Za-z][\w.-]*[A-Za-z0-9])__?(?![\w`])"), r"\1"),  # Python_ references
    (re.compile(r"``(.+?)``", re.S), r"\1"),  # inline literals
    (re.compile(r"`([^`<]*?)\s*<[^`<>]*>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"`([^`]+)`__?"), r"\1"),  # `text`_ references
    (re.compile(r"`([^`]+)`"), r"\1"),  # default-role interpreted text
    (re.compile(r"\*\*(\S(?:[^*]*?\S)?)\*\*"), r"\1"),  # **strong**
    (re.compile(r"(?<![\w*\\])\*(\S(?:[^*\n]*?\S)?)\*(?![\w*])"), r"\1"),  # *emphasis*
    (re.compile(r"\s?\[(?:#\w*|\d+|\*)\]_"), ""),  # footnote references
    (re.compile(r"\\ "), ""),  # escaped space (joins inline markup to a word)
]


def _role_text(m: re.Match) -> str:
    role = m.group(0)[1 : m.group(0).index("`") - 1].split(":")[-1]
    body = " ".join(m.group(1).split())
    titled = re.match(r"^(.*?)\s*<([^<>]*)>$", body)
    if titled:
        return titled.group(1) or titled.group(2)
    if role in _NUMBERED_ROLES:
        return _NUMBERED_ROLES[role].format(body)
    body = body.lstrip("!")
    if body.startswith("~"):
        return body[1:].rsplit(".", 1)[-1]
    return body


def clean_inline(text: str) -> str:
    """Remove inline markup from prose (see the module docstring); newlines are kept."""
    text = _ROLE.sub(_role_text, text)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """First index at or after ``start`` of a non-blank line indented ``indent`` or less."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
        j += 1
    return j


def _directive(name: str, arg: str, body: list[str]) -> list[tuple[str, str]]:
    """The (kind, text) pieces of one directive whose option lines are already removed."""
    if name in DROP_DIRECTIVES:
        return []
    inner = textwrap.dedent("\n".join(body)).strip("\n")
    if name in CODE_DIRECTIVES:
        return [("code", inner)] if inner else []
    head = []
    if name in VERSION_DIRECTIVES and arg:
        head = [("prose", VERSION_DIRECTIVES[name].format(arg.split()[0]))]
    elif arg and name not in NO_ARGUMENT:
        head = [("prose", arg)]
    return head + [("prose", "")] * bool(head) + _pieces(inner.splitlines())


def _pieces(lines: list[str]) -> list[tuple[str, str]]:
    """Split ``lines`` into ("prose" | "code", text) pieces, dropping markup-only lines."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            end = _block_end(lines, i + 1, _indent(line))
            body = lines[i + 1 : end]
            while body and body[0].strip() and _OPTION.match(body[0]):
                body = body[1:]
            out += _directive(m.group(2).lower(), (m.group(3) or "").strip(), body) + [("prose", "")]
            i = end
            continue
        if _EXPLICIT.match(line) or _ANONYMOUS_TARGET.match(line):
            i = _block_end(lines, i + 1, _indent(line))
            continue
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line):
            out.append(("prose", ""))
            i += 1
            continue
        if line.rstrip().endswith("::"):
            intro = line.rstrip()[:-2].rstrip()
            if intro.strip():
                out.append(("prose", intro + ("" if line.rstrip()[-3:-2].isspace() else ":")))
            end = _block_end(lines, i + 1, _indent(line))
            code = textwrap.dedent("\n".join(lines[i + 1 : end])).strip("\n")
            if code:
                out.append(("code", code))
            out.append(("prose", ""))
            i = end
            continue
        out.append(("prose", line.rstrip()))
        i += 1
    return out


def clean_rst(text: str) -> str:
    """Plain text of one reStructuredText document (see the module docstring).

    Paragraphs and code blocks are separated by one blank line; no line has trailing spaces.
    """
    lines = text.replace("\r\n", "\n").expandtabs(8).split("\n")
    blocks, prose = [], []

    def flush() -> None:
        if prose:
            blocks.append(clean_inline("\n".join(prose)))
            prose.clear()

    for kind, piece in _pieces(lines):
        if kind == "code":
            flush()
            blocks.append(piece)
        else:
            prose.append(piece)
    flush()
    joined = "\n\n".join(b.strip("\n") for b in blocks if b.strip())
    joined = "\n".join(line.rstrip() for line in joined.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", joined).strip()
