"""The wikitext cleaner and the MediaWiki XML reader on constructed input."""

from __future__ import annotations

import io
import re

from dsla.data.sources import iter_mediawiki_pages
from dsla.data.wikitext import clean_wikitext, split_sections

ARTICLE = """{{Short description|Test article}}
{{Infobox city|name=Testville|population={{formatnum:1234}}|image=[[File:T.jpg|thumb]]}}
'''Testville''' ({{IPA|/tɛst/}}) is a [[town]] in [[Fooland|the land of Foo]].<ref name="a">{{cite web|url=http://x.org|title=X}}</ref>
It has a river.<ref>Smith, ''River'', p.&nbsp;3.</ref> It was founded in 1900.<ref name="a" />
<!-- hidden editor note with [[link]] -->
[[File:Testville.jpg|thumb|250px|A [[bridge]] in Testville]]
Population: 1,234&nbsp;people.<br />Mayor: <span style="color:red">Jane Doe</span>.

== History ==
The town grew after the [http://example.org railway] arrived in [[1901]].
{| class="wikitable"
! Year !! People
|-
| 1900 || 10
|}
* First item about [[schools]]
* Second item

== Empty section ==
{{Main|Somewhere}}

=== Sub ===
Some text in a subsection with {{nowrap|a template}} removed.

== References ==
{{Reflist}}
=== More refs ===
* A reference that must go

== External links ==
* [http://example.org Official site]

[[Category:Towns]]
[[de:Testville]]
"""

MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|<[a-zA-Z/!]|&[a-z]+;|'''|''")


def test_clean_wikitext_removes_markup_and_keeps_prose():
    text = clean_wikitext(ARTICLE)
    assert not MARKUP.search(text), text
    for kept in ("Testville is a town in the land of Foo.", "It has a river.", "Jane Doe",
                 "railway arrived in 1901", "First item about schools", "History", "Sub",
                 "Some text in a subsection with removed."):
        assert kept in text, (kept, text)
    for dropped in ("cite web", "Smith", "hidden editor note", "bridge", "Year", "Towns",
                    "Testville.jpg", "References", "reference that must go", "External links",
                    "Official site", "Short description", "Infobox", "1234", "thumb"):
        assert dropped not in text, (dropped, text)


def test_headings_are_plain_lines_and_empty_sections_vanish():
    lines = clean_wikitext(ARTICLE).splitlines()
    assert "History" in lines and "Sub" in lines
    # "Empty section" has no text of its own but keeps its subsection, so it stays.
    assert "Empty section" in lines
    assert "== History ==" not in lines
    assert clean_wikitext("Lead text.\n== Only a table ==\n{|\n|a\n|}\n") == "Lead text."


def test_unbalanced_markup_does_not_swallow_later_sections():
    text = clean_wikitext("Intro.<ref>never closed\n== Later ==\nStill here.\n== See also ==\n* x\n")
    assert "Still here." in text and "Later" in text.splitlines()
    assert "never closed" not in text and "See also" not in text
    assert [lvl for lvl, _, _ in split_sections("a\n== B ==\nb\n=== C ===\nc")] == [0, 2, 3]


XML = b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Real</title><ns>0</ns><id>1</id><revision><text>Body of '''Real'''.</text></revision></page>
<page><title>Alias</title><ns>0</ns><id>2</id><redirect title="Real" /><revision><text>#REDIRECT [[Real]]</text></revision></page>
<page><title>Wikipedia:Policy</title><ns>4</ns><id>3</id><revision><text>Policy text.</text></revision></page>
<page><title>Old redirect</title><ns>0</ns><id>4</id><revision><text>#redirect [[Real]]</text></revision></page>
</mediawiki>"""


def test_mediawiki_reader_skips_redirects_and_other_namespaces():
    pages = list(iter_mediawiki_pages(io.BytesIO(XML)))
    assert pages == [("1", "Real", "Body of '''Real'''.")]
