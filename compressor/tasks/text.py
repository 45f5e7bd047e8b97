"""Text for the speech and language tasks: the King James Bible from Debian's ``bible-kjv``
package (``bible -f "Gen1:1-Rev22:21"``), and the 29-symbol character alphabet of Deep Speech 2
(CTC blank, space, apostrophe, a–z)."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

BLANK = 0
ALPHABET = "_ '" + "abcdefghijklmnopqrstuvwxyz"  # index 0 is the CTC blank
CHAR_TO_INDEX = {c: i for i, c in enumerate(ALPHABET)}

_VERSE_REF = re.compile(r"^\S+\d+:\d+\s+")
_NOT_IN_ALPHABET = re.compile(r"[^a-z' ]+")


def normalize(text: str) -> str:
    """Lower case, keep letters, apostrophes and single spaces (what a speaker says)."""
    text = _NOT_IN_ALPHABET.sub(" ", text.lower().replace("-", " "))
    return " ".join(text.split())


def encode(text: str) -> list[int]:
    """Alphabet indices of a normalized transcript."""
    return [CHAR_TO_INDEX[c] for c in text]


def decode(indices) -> str:
    return "".join(ALPHABET[int(i)] for i in indices)


@functools.cache
def king_james_verses() -> tuple[str, ...]:
    """The 31,102 verses of the King James Bible, in canonical order, verse references removed.

    Needs Debian's ``bible-kjv`` package (installed by ``scripts/setup.sh``)."""
    if shutil.which("bible") is None:
        raise RuntimeError("the King James text needs Debian's bible-kjv package: "
                           "run scripts/setup.sh (apt-get install bible-kjv bible-kjv-text)")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    return tuple(_VERSE_REF.sub("", line).strip() for line in out.splitlines() if line.strip())


def king_james_words() -> list[str]:
    """The whole text as normalized words, in order."""
    return normalize(" ".join(king_james_verses())).split()


def split_point(n: int, test_fraction: float) -> int:
    """Index where the held-out tail of a sequence of ``n`` items begins."""
    return int(round(n * (1.0 - test_fraction)))
