"""vlm-compress: compression and export toolchain for BLIP-2-family vision-language models.

The package is light to import: heavy libraries (torch, transformers, peft) are imported
inside the functions that need them, so ``compress validate`` and ``--help`` start fast.
"""

__version__ = "0.1.0"
