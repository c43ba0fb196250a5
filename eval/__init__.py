"""Metrics and their file formats: captioning (COCO caption evaluation), VQA, MME, BERTScore, CLIPScore.

``eval.metrics`` is the one metric table (key, display name, direction, kind, needs, who computes
it); ``eval.characteristics`` measures parameters, GFLOPs, latency and memory; ``eval.gates``,
``eval.reports`` and ``eval.plots`` judge and show records; ``eval.predictions`` reads and writes
prediction and reference files. Captioning a dataset with a model and building the evaluation
record is ``compressor.evaluation``.

``eval`` shadows a Python builtin, so import its modules, never the package itself::

    from eval.captioning import score_captions
    from eval.vqa import vqa_accuracy

Every metric is reported on the 0-100 scale papers use (CIDEr 124.2, not 1.242) under the
lowercase keys of DESIGN.md ("Conventions every part shares"). Nothing here imports the pipeline
(``compressor.pipeline``, ``compressor.stages``, ``compressor.cli``); typed errors come from
``compressor.errors``.
"""
