"""Text cut into parts for encoding: the whole text kept, cuts at line breaks, blank lines preferred."""

from __future__ import annotations

from gpt.data.encode import cut


def test_cut_keeps_the_text_and_cuts_at_line_breaks():
    text = "".join(f"line {i} of a paragraph\n" + ("\n" if i % 7 == 0 else "") for i in range(2000))
    parts = list(cut([text[:10_000], text[10_000:]], 1000))
    assert "".join(parts) == text
    assert all(len(p) <= 1000 for p in parts)
    assert all(p.endswith("\n") for p in parts)
    assert sum(p.endswith("\n\n") for p in parts[:-1]) >= len(parts) // 2  # blank lines preferred
    assert list(cut(["x" * 2500], 1000)) == ["x" * 1000, "x" * 1000, "x" * 500]  # no line break: hard cut
