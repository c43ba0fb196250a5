"""`compress search` on the tiny preset: bad input exits 2 before any trial; two workers share one
SQLite study without running a trial twice; a killed search resumes with nothing lost or repeated;
a throw-away stage is searchable with no change to the search code. Few trials, tiny data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.inprocess import run_inprocess

pytest.importorskip("optuna")

RECIPE = """\
name: tiny_search
model: tiny-blip2-opt
seed: 0
data:
  format: synthetic
  train: {{size: 8}}
  eval: {{size: 4}}
generation: {{max_new_tokens: 4, batch_size: 4}}
stages:
  - type: evaluate
    label: baseline
    metrics: [rouge_1]
    characteristics: {{latency: null, gflops: false}}
  - type: remove_layers
    qformer: {{drop_top: 2}}
    language_model: {{drop_top: 2}}
  - type: heal
    loss: distill
    distill: {{teacher: baseline}}
    parts: [language_model.attention]
    train: {{steps: 2, batch_size: 4, learning_rate: 1.0e-3}}
  - type: merge_adapters
  - type: evaluate
    label: candidate
    metrics: [rouge_1]
    characteristics: {{latency: null, gflops: false}}
gate:
  candidate: candidate
  baseline: baseline
  rules: {{rouge_1: {{min: 0}}, params_total: {{max_ratio: 0.95}}}}
search:
{search}
"""
SPACE = """\
  space:
    remove_layers.language_model.drop_top: [0, 1, 2]
    remove_layers.qformer.drop_top: [0, 2]
  budget: {short_eval_limit: 2}"""


def write(tmp_path: Path, search: str = SPACE, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(RECIPE.format(search=search))
    return p


def trials(out: Path) -> list[dict]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def valid_run(run: Path) -> None:
    """A trial folder is a run directory like any apply's: complete manifest, report, final model."""
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete", run
    assert (run / "report.json").is_file() and (run / "final" / "config.json").is_file()
    assert not (run / ".lock").exists()


@pytest.mark.parametrize(
    "search, expected",
    [
        (SPACE.replace("qformer.drop_top", "qformer.drop_topp"), r"r\.yaml:\d+: search\.space\.remove_layers\.qformer\.drop_topp: "
         r"the value 0 is refused: .*unknown key 'drop_topp'"),
        (SPACE.replace("[0, 2]", "[0, -2]"), r"search\.space\.remove_layers\.qformer\.drop_top: the value -2 is refused"),
        (SPACE.replace("remove_layers.language_model", "remove_layer.language_model"),
         r"no stage of this recipe has the type or label 'remove_layer'.*Did you mean 'remove_layers'"),
        ("  space: {}", r"search\.space: the search space is empty"),
        (SPACE + "\n  objectives: [rouge1, params_total]", r"unknown objective .*'rouge1'.*Did you mean 'rouge_1'"),
    ],
    ids=["unknown-key", "refused-value", "no-such-stage", "empty-space", "bad-objective"],
)
def test_bad_search_input_exits_2_before_any_trial(tmp_path, search, expected):
    import re

    out = tmp_path / "out"
    res = run_inprocess("search", str(write(tmp_path, search)), "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert re.search(expected, res.stderr), res.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search2")
    out = tmp / "out"
    res = run_inprocess("search", str(write(tmp)), "--out", str(out), "--trials", "3", "--workers", "2")
    return res, out


def test_two_workers_share_one_study_and_never_run_a_trial_twice(two_workers):
    import optuna

    res, out = two_workers
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name="tiny_search", storage=f"sqlite:///{out / 'study.db'}")
    ts = study.get_trials()
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in ts)
    ran = [t for t in ts if "duplicate_of" not in t.user_attrs]  # a repeated draw is told, never run
    assert len(ran) == 3  # the lock around "count, ask": no worker overshoots --trials
    assert os.getpid() in {t.user_attrs["pid"] for t in ran} and len({t.user_attrs["pid"] for t in ran}) <= 2
    assert len({tuple(sorted(t.params.items())) for t in ran}) == len(ran)  # no value set ran twice
    assert len({t.user_attrs["run"] for t in ran}) == len(ran)
    assert (out / "worker-1.log").is_file()
    for t in ran:  # every trial folder is a valid run directory; stage 0 (before the searched stage) never reran
        run = out / t.user_attrs["run"]
        valid_run(run)
        statuses = [s["status"] for s in json.loads((run / "manifest.json").read_text())["stages"]]
        assert statuses[0] == "reused", (run, statuses)


def test_results_pareto_plot_and_the_finished_best_run(two_workers):
    from transformers import Blip2ForConditionalGeneration

    res, out = two_workers
    rows = trials(out)
    assert len([r for r in rows if not r["duplicate_of"]]) == 3 and {"rouge_1", "params_total", "short_score", "passed", "run"} <= set(rows[0])
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["objectives"] == ["rouge_1", "params_total"] and pareto["directions"] == ["maximize", "minimize"]
    chosen = pareto["chosen"]
    assert chosen is not None and chosen["passed"] in (True, "True")
    passing = [r for r in rows if r["state"] == "complete" and r["passed"] == "True"]
    assert float(chosen["params_total"]) == min(float(r["params_total"]) for r in passing)
    assert (out / "pareto.png").stat().st_size > 1000
    assert "Chosen: trial" in (out / "report.md").read_text()
    best = out / "result"
    assert best.is_symlink() and best.resolve() == (out / "best").resolve()
    valid_run(best)
    report = json.loads((best / "report.json").read_text())
    assert report["gate"]["passed"] is True
    model = Blip2ForConditionalGeneration.from_pretrained(best / "final")
    assert sum(p.numel() for p in model.parameters()) == int(chosen["params_total"])
    assert "chosen: trial" in res.stdout
    cmp = out.parent / "cmp"  # compress report takes the search folder: its best run and its front
    rep = run_inprocess("report", str(out), "--out", str(cmp), "--metric", "rouge_1", "--against", "params")
    assert rep.returncode == 0, rep.stderr
    md = (cmp / "comparison.md").read_text()
    assert "## Search `tiny_search`" in md and "search-tiny_search-pareto.png" in md


def test_a_killed_search_resumes_with_no_trial_lost_or_repeated(tmp_path):
    """A worker killed mid-trial leaves a RUNNING trial and a run folder with a stale lock; the next
    `compress search` fails that trial, runs its values again in the same folder, and stops at --trials."""
    import socket

    import optuna

    from compressor.pipeline.search import Search, make_plan
    from compressor.recipe.loader import load_recipe

    recipe = write(tmp_path, SPACE.replace("[0, 1, 2]", "[1, 2]").replace("[0, 2]", "[2]"))  # 2 points: grid
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plan = make_plan(load_recipe(recipe), 2)
    s = Search(plan, out)
    study, _ = s.studies(create=True)
    killed = study.ask({d.key: optuna.distributions.CategoricalDistribution(d.choices) for d in plan.dims})
    killed.set_user_attr("host", socket.gethostname())
    killed.set_user_attr("pid", dead.pid)
    folder = out / "trials" / "0000" / "short"
    (folder / "stages" / ".tmp-01-remove_layers-x").mkdir(parents=True)  # half-written stage
    (folder / ".lock").write_text(str(dead.pid))  # as a killed run leaves it

    res = run_inprocess("search", str(recipe), "--out", str(out), "--trials", "2")
    assert res.returncode == 0, res.stderr
    ts = optuna.load_study(study_name="tiny_search", storage=s.storage_url).get_trials()
    first = ts[0]
    assert first.state.name == "FAIL" and first.user_attrs["killed"] is True
    retry = [t for t in ts if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == first.params and retry[0].state.name in ("COMPLETE", "PRUNED")
    counted = [t for t in ts if not t.user_attrs.get("killed")]
    assert len(counted) == 2  # nothing lost, nothing beyond --trials
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 2  # nothing repeated
    assert retry[0].user_attrs["run"].startswith("trials/0000/")
    valid_run(folder)
    assert not any((folder / "stages").glob(".tmp-*"))


STAGE_MODULE = '''
"""A throw-away stage: scales the language model's input embeddings. Nothing else knows it."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.recipe.schema import StageBase
from compressor.stages import Declaration


class ScaleEmbeddingsStage(StageBase):
    """Multiply the input embeddings by a factor (a test stage)."""

    type: Literal["scale_embeddings"]
    factor: float = Field(1.0, gt=0, description="What the embeddings are multiplied by.")


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    import torch

    from compressor.models.folders import load_working_model, model_dir, save_model

    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(cfg.factor)
    save_model(model, processor, model_dir(out_dir))
    return {"factor": cfg.factor}


STAGE = Declaration(config=ScaleEmbeddingsStage, run=run, produces_model=True)
'''

THROWAWAY_RECIPE = """\
name: scaled_search
model: tiny-blip2-opt
data: {format: synthetic, eval: {size: 4}}
generation: {max_new_tokens: 4, batch_size: 4}
stages:
  - type: evaluate
    label: baseline
    metrics: [rouge_1]
    characteristics: {latency: null, gflops: false}
  - type: scale_embeddings
  - type: evaluate
    label: candidate
    metrics: [rouge_1]
    characteristics: {latency: null, gflops: false}
gate:
  candidate: candidate
  baseline: baseline
  rules: {rouge_1: {min: 0}}
search:
  space: {scale_embeddings.factor: [1.0, 0.25]}
  objectives: [rouge_1, params_total]
  budget: {reduction_factor: 2, short_eval_limit: 2}
"""


def test_a_throwaway_stage_is_searchable_without_touching_the_search_code(tmp_path, monkeypatch):
    from compressor.recipe import schema
    from compressor.stages import REGISTRY, register_stage

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "throwaway_search_stage.py").write_text(STAGE_MODULE)
    monkeypatch.syspath_prepend(str(mods))
    register_stage("scale_embeddings", "throwaway_search_stage")
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(THROWAWAY_RECIPE)
        bad = tmp_path / "bad.yaml"
        bad.write_text(THROWAWAY_RECIPE.replace("[1.0, 0.25]", "[1.0, -1]"))
        res = run_inprocess("search", str(bad), "--out", str(tmp_path / "never"))
        assert res.returncode == 2 and "the value -1 is refused" in res.stderr, res.stderr
        out = tmp_path / "out"
        res = run_inprocess("search", str(recipe), "--out", str(out))
        assert res.returncode == 0, res.stderr
        rows = trials(out)
        assert sorted(float(r["scale_embeddings.factor"]) for r in rows) == [0.25, 1.0]  # grid: both, once
        for r in rows:
            run = out / r["run"]
            valid_run(run)
            factor = json.loads((run / "manifest.json").read_text())["stages"][1]["summary"]["factor"]
            assert factor == float(r["scale_embeddings.factor"])
    finally:
        REGISTRY.pop("scale_embeddings", None)
        schema.recipe_model.cache_clear()
        sys.modules.pop("throwaway_search_stage", None)
    assert "scale_embeddings" not in Path(__file__).resolve().parents[2].joinpath("compressor/pipeline/search.py").read_text()
