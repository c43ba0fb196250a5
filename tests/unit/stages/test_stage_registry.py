"""A stage is one module plus one registry line: the recipe union, the type list, pre-flight, the
plan, the runner (cache keys, reuse, resume), the docs and the model card all read its declaration."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

#: The whole throw-away stage: its config, its run, its declaration. Nothing else in the project knows it.
STAGE_MODULE = '''
"""A throw-away stage for the registry test: scales the language model's input embeddings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.recipe.schema import StageBase
from compressor.stages import Declaration, StageCard


class ScaleEmbeddingsStage(StageBase):
    """Multiply the input embeddings by a factor (a test stage)."""

    type: Literal["scale_embeddings"]
    factor: float = Field(2.0, gt=0, description="What the embeddings are multiplied by.")


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    import torch

    from compressor.models.folders import load_working_model, model_dir, save_model

    if os.environ.get("SCALE_FAIL_AT") == str(ctx.index):
        raise RuntimeError("scale_embeddings: asked to fail")
    with open(os.environ["SCALE_RUNS"], "a") as fh:
        fh.write(f"{ctx.index}\\n")
    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(cfg.factor)
    save_model(model, processor, model_dir(out_dir))
    return {"factor": cfg.factor}


def check(cfg, pf) -> None:
    from compressor.errors import UserInputError

    if cfg.factor > 100:
        raise UserInputError(f"factor {cfg.factor} would overflow the embeddings")


def plan(cfg, pc) -> dict:
    pc.notes.append(f"stage {pc.index}: embeddings scaled by {cfg.factor}")
    return {"scaled_by": cfg.factor}


STAGE = Declaration(
    config=ScaleEmbeddingsStage,
    run=run,
    produces_model=True,
    needs_merged=True,
    check=check,
    plan=plan,
    card=lambda record: StageCard(details=[f"factor {record['summary']['factor']}"], tags=["scaled"]),
)
'''

RECIPE = """\
name: scaled
model: tiny-blip2-opt
stages:
  - type: scale_embeddings
    factor: 2.0
  - type: scale_embeddings
    label: twice
    factor: 0.5
"""


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """Write the stage module, register it (the one line), and unregister it afterwards."""
    from compressor.recipe import schema
    from compressor.stages import REGISTRY, register_stage

    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / "throwaway_scale.py").write_text(STAGE_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("SCALE_RUNS", str(tmp_path / "runs.txt"))
    register_stage("scale_embeddings", "throwaway_scale")
    try:
        yield tmp_path
    finally:
        REGISTRY.pop("scale_embeddings", None)
        schema.recipe_model.cache_clear()
        sys.modules.pop("throwaway_scale", None)


def _runs(tmp_path: Path) -> list[int]:
    path = tmp_path / "runs.txt"
    return [int(x) for x in path.read_text().split()] if path.is_file() else []


def test_a_new_stage_is_one_module_and_one_registry_line(throwaway):
    from compressor.errors import RecipeError, UserInputError
    from compressor.pipeline.publish import stage_card
    from compressor.pipeline.runner import Runner
    from compressor.planning import plan_recipe
    from compressor.recipe.docs import recipe_reference
    from compressor.recipe.loader import load_recipe
    from compressor.recipe.schema import STAGE_TYPES

    tmp_path = throwaway
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert "scale_embeddings" in STAGE_TYPES

    # validate: the schema knows its fields, with lines and did-you-mean
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("factor: 0.5", "factr: 0.5"))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert re.search(r"bad\.yaml:8: stages\.1\.factr: unknown key 'factr'.*Did you mean 'factor'", str(err.value)), str(err.value)
    loaded = load_recipe(recipe)

    # pre-flight calls its check with the model's config (no weights)
    over = load_recipe(recipe, ["stages.1.factor=200"])
    with pytest.raises(RecipeError, match=r"stages\.1: factor 200.0 would overflow"):
        Runner(over, tmp_path / "never", progress=False).preflight()
    assert not (tmp_path / "never").exists()

    # plan: its hook's row and note
    plan = plan_recipe(loaded, gflops=False)
    assert [s.get("scaled_by") for s in plan["stages"]] == [2.0, 0.5]
    assert "stage 1: embeddings scaled by 0.5" in plan["notes"]

    # apply: runs, caches, resumes
    run_dir = tmp_path / "run"
    os.environ["SCALE_FAIL_AT"] = "1"
    try:
        with pytest.raises(RuntimeError, match="asked to fail"):
            Runner(loaded, run_dir, progress=False).run()
    finally:
        del os.environ["SCALE_FAIL_AT"]
    assert _runs(tmp_path) == [0]
    (run_dir / ".lock").write_text("999999")  # as a killed run leaves it
    with pytest.raises(UserInputError, match="--resume"):
        Runner(loaded, run_dir, progress=False).preflight()
    Runner(loaded, run_dir, resume=True, progress=False).run()
    assert _runs(tmp_path) == [0, 1]  # stage 0 was reused, stage 1 ran
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["reused", "ran"]
    assert [s["summary"] for s in manifest["stages"]] == [{"factor": 2.0}, {"factor": 0.5}]
    Runner(loaded, run_dir, progress=False).run()
    assert _runs(tmp_path) == [0, 1]  # everything cached
    changed = load_recipe(recipe, ["stages.1.factor=0.25"])
    Runner(changed, run_dir, progress=False).run()
    assert _runs(tmp_path) == [0, 1, 1]  # a config change reruns that stage only

    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    base = load_file(str(next((run_dir / "inputs").glob("tiny-blip2-opt-*")) / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    assert (weights[key] - base[key] * 2.0 * 0.25).abs().max() < 1e-6

    # docs and card
    ref = recipe_reference()
    assert "stages: type: scale_embeddings" in ref and "What the embeddings are multiplied by." in ref
    card = stage_card({"type": "scale_embeddings", "summary": {"factor": 2.0}})
    assert card == {"description": "Multiply the input embeddings by a factor (a test stage).",
                    "details": ["factor 2.0"], "tags": ["scaled"], "limitations": [], "loading": None}


def test_the_union_types_docs_and_card_all_come_from_the_registry():
    import typing

    from compressor.pipeline.publish import stage_card
    from compressor.recipe.docs import stage_sections
    from compressor.recipe.schema import STAGE_TYPES, recipe_model
    from compressor.stages import REGISTRY, declarations

    decls = declarations()
    assert STAGE_TYPES == tuple(REGISTRY) == tuple(d.type for d in decls)
    union = typing.get_args(typing.get_args(recipe_model().model_fields["stages"].annotation)[0])[0]
    assert typing.get_args(union) == tuple(d.config for d in decls)
    assert [(s.type, s.config, s.description) for s in stage_sections()] == [(d.type, d.config, d.description) for d in decls]
    for d in decls:
        assert d.config.__module__ == REGISTRY[d.type]  # config and declaration live in the stage's own module
        assert stage_card({"type": d.type, "summary": {}})["description"] == d.description != ""


def test_no_stage_type_is_named_outside_its_own_module():
    """The runner, pre-flight, planning, distributed runs, commands and the card branch on declarations only."""
    out = subprocess.run(
        ["git", "grep", "-nE", r"\"(" + "|".join(_types()) + r")\"", "--", "compressor/pipeline", "compressor/planning.py",
         "compressor/commands", "compressor/recipe", "exporters/model_card.py", "compressor/cli.py"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.stdout == "", textwrap.indent(out.stdout, "  ")


def _types() -> list[str]:
    """Stage types that are not also ordinary words of the code (command names, output kinds)."""
    from compressor.stages import REGISTRY

    return [t for t in REGISTRY if t not in ("export", "evaluate", "predict")]
