"""``--fast-dev-run [N]``: the override layer cuts every shared schema type wherever it sits, in every recipe."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _models(value):
    if isinstance(value, BaseModel):
        yield value
        for name in type(value).model_fields:
            yield from _models(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _models(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _models(v)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_cut_everywhere(path):
    from compressor.recipe import schema as S
    from compressor.recipe.dev_run import load_fast_dev_run
    from compressor.recipe.loader import load_recipe

    loaded = load_fast_dev_run(path, n=3)
    r = loaded.recipe
    assert loaded.fast_dev_run == 3 and loaded.overrides  # recorded like --set overrides
    seen = set()
    for m in _models(r):
        seen.add(type(m).__name__)
        if isinstance(m, S.TrainSpec):
            assert (m.steps, m.gradient_accumulation_steps, m.warmup_steps, m.warmup_ratio) == (3, 1, 0, 0.0)
            assert m.batch_size <= 2 and (m.eval_every in (None, 3)) and (m.eval_limit is None or m.eval_limit <= 4)
        elif isinstance(m, S.CalibrationSpec):
            assert m.batches == 1 and m.batch_size <= 2
        elif isinstance(m, S.CharacteristicsSpec):
            assert m.gflops_new_tokens <= 4 and (m.latency is None or (m.latency.batch_sizes, m.latency.repeats) == ([1], 1))
        elif isinstance(m, S.DataSource):
            assert m.limit is not None and m.limit <= 4
    assert r.generation.max_new_tokens <= 4 and r.generation.batch_size <= 2
    assert r.push is None or r.push.dry_run
    full = load_recipe(path).recipe
    assert r.generation.num_beams == full.generation.num_beams  # beam search stays a mechanism to exercise
    assert [s.type for s in r.stages] == [s.type for s in full.stages]
    assert "TrainSpec" in seen or not any(hasattr(s, "train") for s in full.stages)


def test_user_overrides_come_first_and_n_is_checked(tmp_path):
    from compressor.errors import RecipeError
    from compressor.recipe.dev_run import dev_run_overrides, load_fast_dev_run

    path = REPO / "recipes" / "llm28_q8.yaml"
    loaded = load_fast_dev_run(path, ["stages.0.train.batch_size=1", "generation.num_beams=2"])
    assert loaded.recipe.stages[0].train.batch_size == 1 and loaded.recipe.generation.num_beams == 2
    assert loaded.overrides[:2] == ["stages.0.train.batch_size=1", "generation.num_beams=2"]
    assert "stages.0.train.steps=2" in loaded.overrides
    assert dev_run_overrides(loaded.recipe, 2) == []  # a cut recipe needs no further cut
    with pytest.raises(RecipeError, match="at least 1"):
        load_fast_dev_run(path, n=0)


def test_cli_option_takes_an_optional_count_after_the_recipe(tmp_path, monkeypatch):
    from tests.integration.inprocess import run_inprocess

    monkeypatch.chdir(tmp_path)
    rec = REPO / "recipes" / "demo.yaml"
    r = run_inprocess("apply", str(rec), "--fast-dev-run", "3", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "runs/demo-fast-dev-run" in r.stdout
    r = run_inprocess("apply", "--fast-dev-run", str(rec))
    assert r.returncode == 2 and "write the option after the recipe" in r.stderr
    assert not (tmp_path / "runs").exists()
