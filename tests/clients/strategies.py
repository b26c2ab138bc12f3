"""Hypothesis strategies for the names an app may hand the link helpers."""

from __future__ import annotations

from hypothesis import strategies as st

# Characters that URLs, CouchDB and Unicode make awkward; "e" then "\u0301" is é in NFD.
AWKWARD = [
    "/",
    "+",
    " ",
    "é",
    "e",
    "\u0301",
    "?",
    "#",
    "%",
    "&",
    "=",
    ";",
    "~",
    "!",
    "*",
    "'",
    "(",
    ")",
    "\U0001f600",
]
character = st.one_of(
    st.sampled_from(AWKWARD),
    st.characters(exclude_categories=("Cs", "Cc")),  # no lone surrogates, no control characters
)


def _usable(name: str) -> bool:
    return bool(name) and not any(part in (".", "..") for part in name.split("/"))


database = st.from_regex(r"[a-z][a-z0-9_$()+/-]{0,20}", fullmatch=True).filter(_usable)
docid = st.text(character, min_size=1, max_size=30).filter(lambda d: _usable(d) and not d.startswith("_"))
attachment = st.lists(
    st.text(character.filter(lambda c: c != "/"), min_size=1, max_size=15).filter(_usable),
    min_size=1,
    max_size=4,
).map("/".join)
token = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)

# Anything at all, refusals included: control characters, lone surrogates, "_", "." segments, capitals.
anything = st.text(
    st.one_of(
        st.sampled_from([*AWKWARD, ".", "_", "A", "\x00", "\n", "\x7f", "\ud800", "\udfff", "a", "z"]),
        st.characters(),
    ),
    max_size=20,
)
# Either side of the 16-character minimum, astral characters included (characters count, not UTF-16 units).
_token_character = st.one_of(
    st.sampled_from(["\U0001f600", "é", "+"]), st.characters(exclude_categories=("Cs",))
)
signing_token = st.one_of(
    st.text(_token_character, min_size=16, max_size=40),
    st.text(_token_character, min_size=15, max_size=15),
)
