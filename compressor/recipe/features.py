"""Recipe keys that validate but whose feature is not built in this version.

``compress apply`` calls :func:`unbuilt` before writing anything and exits 2 naming each
feature, so a recipe written for a later version fails clearly instead of half-running. As
features land, their checks are removed from here.
"""

from __future__ import annotations


def unbuilt(recipe) -> list[tuple[tuple, str]]:
    """``(field path, feature)`` for every recipe key this version cannot run yet."""
    out: list[tuple[tuple, str]] = []
    # Every key of the schema is built in this version; checks for later keys go here.
    del recipe
    return out
