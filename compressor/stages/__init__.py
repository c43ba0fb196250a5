"""Stage registry: explicit, by name, lazily imported (peft's registry style, Olive's lazy passes).

Every stage module defines:

* ``PRODUCES_MODEL``: whether its output folder holds a new model (``model/``) that becomes the
  input of the next stage, or only artifacts (metrics, exports, predictions);
* ``data_sections(config) -> list[str]``: the data sections it reads (part of its cache key);
* ``run(config, ctx, input_dir, out_dir) -> dict``: reads the input model folder, writes a NEW
  folder (never changes its input) and returns a JSON-able summary for the manifest.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "lora_finetune": "compressor.stages.lora_finetune",
    "finetune": "compressor.stages.finetune",
    "merge_adapters": "compressor.stages.merge_adapters",
    "remove_layers": "compressor.stages.remove_layers",
    "prune_width": "compressor.stages.prune_width",
    "heal": "compressor.stages.heal",
    "export": "compressor.stages.export",
    "evaluate": "compressor.stages.evaluate",
    "predict": "compressor.stages.predict",
}


def get_stage(type_: str) -> ModuleType:
    """Import and return the module of stage ``type_``.

    Raises:
        KeyError: unknown stage type (the recipe schema rejects these before this is reached).
    """
    return importlib.import_module(REGISTRY[type_])
