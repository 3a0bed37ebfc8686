"""mkdocs hook: the docstrings use Sphinx roles (``:func:`name```); mkdocstrings renders the
name as code and leaves the role prefix as text. Drop the prefix, keep the code."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj|const):(?=<code)")


def on_page_content(html: str, **kwargs) -> str:
    """Remove ``:role:`` text directly before rendered inline code."""
    return _ROLE.sub("", html)
