"""Text files as a collaborator hands them over, from Excel or a Windows editor: the encoding a
file is in where it is not UTF-8 (Excel's "Unicode Text" export is UTF-16), the separator a
table's line uses, and gene names Excel turned into dates (``SEPT2`` -> ``2-Sep``). Standard
library only, so that every layer (the config too) may use it."""
from __future__ import annotations

import re

_MONTHS = "jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec"
_EXCEL_DATE = re.compile(rf"(\d{{1,2}}-({_MONTHS})|({_MONTHS})-\d{{1,2}})", re.IGNORECASE)
SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "vertical-bar"}


def unicode_encoding(path) -> str | None:
    """``"UTF-16"`` or ``"UTF-32"`` where the file at ``path`` is in that encoding (by its
    byte-order mark, or UTF-16 without one: a zero byte in every other place), else ``None``."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    if len(head) >= 4 and max(head[0::2].count(0), head[1::2].count(0)) >= len(head) // 2 - 1:
        return "UTF-16"
    return None


def encoding_error(path, what: str) -> ValueError | None:
    """An error naming ``what`` file ``path`` and its encoding where it is UTF-16/32 text, else ``None``."""
    found = unicode_encoding(path)
    if found is None:
        return None
    return ValueError(f"{what} {str(path)!r} is {found} text (as Excel's 'Unicode Text' export writes it), not "
                      "UTF-8; save it as UTF-8 (Excel: 'CSV UTF-8' or 'Text (Tab delimited)')")


def separator_of(line: str) -> str | None:
    """The name of the separator most used in ``line`` (``"semicolon"``...), or ``None``."""
    counts = {sep: line.count(sep) for sep in SEPARATORS}
    best = max(counts, key=counts.get)
    return SEPARATORS[best] if counts[best] else None


def is_blank(path) -> bool:
    """Whether the file at ``path`` holds nothing but blanks (and a byte-order mark)."""
    with open(path, "rb") as fh:
        return not fh.read(1 << 16).strip(b"\xef\xbb\xbf \t\r\n")


def excel_dates(names) -> list[str]:
    """The ``names`` that read as dates Excel made of gene names (``2-Sep``, ``1-Mar``, ``Mar-1``)."""
    return [str(n) for n in names if _EXCEL_DATE.fullmatch(str(n).strip())]


def excel_date_hint(names) -> str:
    """A sentence naming the ``names`` that look like Excel dates, or ``""``."""
    dates = excel_dates(names)
    if not dates:
        return ""
    return (f"; {', '.join(repr(d) for d in dates[:5])} look(s) like date(s) Excel made of gene names (SEPT2 -> "
            "2-Sep, MARCH1 -> 1-Mar): restore the gene names, and import gene columns as Text")
