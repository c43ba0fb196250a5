"""Recipe keys that validate but whose feature is not built in this version.

``compress apply`` calls :func:`unbuilt` before writing anything and exits 2 naming each
feature, so a recipe written for a later version fails clearly instead of half-running. As
features land, their checks are removed from here.
"""

from __future__ import annotations

from compressor.recipe.schema import Recipe

#: Import paths whose presence means a feature is built (checked lazily, cheap).
_ONNX_MODULE = "exporters.onnx_export"


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def unbuilt(recipe: Recipe) -> list[tuple[tuple, str]]:
    """``(field path, feature)`` for every recipe key this version cannot run yet."""
    out: list[tuple[tuple, str]] = []
    onnx_built = _module_exists(_ONNX_MODULE)
    for i, st in enumerate(recipe.stages):
        if st.type == "export" and "onnx" in st.formats and not onnx_built:
            out.append((("stages", i, "formats"), "ONNX export"))
        if st.type in ("evaluate", "predict") and st.backend == "onnx" and not onnx_built:
            out.append((("stages", i, "backend"), "evaluation of an ONNX export (backend: onnx)"))
    return out
