"""Shared fixtures of the metric tests: one METEOR process for the whole session (5-7 s to start)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def caption_scorer():
    """A CaptionScorer shared by every caption test; skipped where no Java runtime is installed."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: the COCO caption metrics need a Java runtime")
    from eval.captioning import CaptionScorer

    with CaptionScorer() as scorer:
        yield scorer
