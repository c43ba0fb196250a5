"""Recipe keys that validate but whose feature is not built in this version.

``compress apply`` calls :func:`unbuilt` before writing anything and exits 2 naming each
feature, so a recipe written for a later version fails clearly instead of half-running. As
features land, their checks are removed from here.
"""

from __future__ import annotations

from compressor.recipe.schema import Recipe


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def unbuilt(recipe: Recipe) -> list[tuple[tuple, str]]:
    """``(field path, feature)`` for every recipe key this version cannot run yet."""
    out: list[tuple[tuple, str]] = []
    for i, st in enumerate(recipe.stages):
        if st.type == "prune_width":
            out.append((("stages", i, "type"), "width pruning (prune_width)"))
        if st.type == "remove_layers" and not _module_exists("compressor.importance"):
            sels = [st.vision, st.qformer]
            lm = st.language_model
            if lm is not None:
                sels += [lm.encoder, lm.decoder] if hasattr(lm, "encoder") else [lm]
            if any(s is not None and s.count is not None for s in sels):
                out.append((("stages", i), "importance-based layer selection (count + select)"))
    if recipe.push is not None and not recipe.push.dry_run and not _module_exists("exporters.hub"):
        out.append((("push",), "uploading to the Hub (use push.dry_run: true)"))
    return out
