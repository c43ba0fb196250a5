"""Metrics and their file formats: captioning (COCO caption evaluation), VQA, MME, BERTScore, CLIPScore.

``eval`` shadows a Python builtin, so import its modules, never the package itself::

    from eval.captioning import score_captions
    from eval.vqa import vqa_accuracy

Every metric is reported on the 0-100 scale papers use (CIDEr 124.2, not 1.242) under the
lowercase keys of DESIGN.md ("Conventions every part shares"). Nothing here imports the pipeline
(``compressor.pipeline``, ``compressor.stages``, ``compressor.cli``); typed errors come from
``compressor.errors``.
"""
