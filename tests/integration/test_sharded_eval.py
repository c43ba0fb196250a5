"""Sharded evaluation and prediction: 2 processes under `accelerate launch` (CPU, gloo) give one process's record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

RECIPE = """\
name: sharded
model: shapes-teacher
seed: 0
data:
  format: synthetic
  eval: {size: 64, seed: 2000, image_size: 64}
generation: {max_new_tokens: 12, batch_size: 12}
stages:
  - type: evaluate
    label: whole
    metrics: [bleu_4, cider]
    characteristics: {latency: null, gflops: false}
  - type: predict
    data: eval
"""


def _launch(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compressor.cli", *args]
    if nproc > 1:  # --multi_gpu starts the workers; without GPUs accelerate picks gloo on the CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "compressor.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_caption_their_shares_and_the_main_one_scores_them_once(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(RECIPE)
    out = {}
    for n in (1, 2):
        res = _launch(["-q", "apply", str(r), "--out", str(tmp_path / f"run{n}")], tmp_path, n)
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = tmp_path / f"run{n}"
    ev = {n: json.loads(next((run / "stages").glob("00-evaluate-*/eval.json")).read_text()) for n, run in out.items()}
    preds = {n: next((run / "stages").glob("00-evaluate-*/predictions.json")).read_text() for n, run in out.items()}
    captions = [p["caption"] for p in json.loads(preds[1])]
    assert len(captions) == 64 and len(set(captions)) >= 10  # teeth: the order of the gathered captions matters
    assert preds[2] == preds[1]  # same captions, same order (6 batches of 12, the last of 4: 3 per process)
    assert ev[2]["metrics"] == ev[1]["metrics"] and ev[1]["metrics"]["cider"] > 0
    assert any("captions from 2 processes" in note for note in ev[2]["notes"])
    assert ev[2]["characteristics"]["avg_inference_processes"] == 2
    p = {n: next((run / "stages").glob("01-predict-*/predictions.json")).read_text() for n, run in out.items()}
    assert p[2] == p[1] == preds[1]
    assert not [f for f in out[2].iterdir() if f.name.startswith(".rank")]  # the others' scratch folders are gone
