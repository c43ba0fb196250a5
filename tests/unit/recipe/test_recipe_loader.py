"""Recipe schema and loader: line numbers, did-you-mean, all errors at once, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import RecipeError
from compressor.recipe.loader import apply_override, load_recipe

REPO = Path(__file__).resolve().parents[3]

GOOD = """\
name: t
model: tiny-blip2-opt
data:
  format: synthetic
  train: {size: 8}
  eval: {size: 4}
stages:
  - type: lora_finetune
    parts: [qformer.self_attention]
    train: {steps: 2}
  - type: merge_adapters
  - type: evaluate
    label: baseline
  - type: remove_layers
    language_model: {drop_top: 2}
  - type: evaluate
    label: candidate
gate:
  candidate: candidate
  baseline: baseline
  rules: {cider: {max_drop: 5}}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, text), overrides)
    return exc.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    import warnings

    loaded = load_recipe(path)
    assert loaded.recipe.name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pydantic serialising a model spec under the wrong union tag
        assert len(loaded.hash()) == 64
        loaded.recipe.model_dump()


def test_good_recipe_fills_defaults(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD))
    r = loaded.recipe
    assert r.dtype == "float32" and r.generation.num_beams == 1
    assert r.stages[0].lora.r == 8 and r.stages[0].train.steps == 2
    assert "lora_alpha: 16" in loaded.resolved_yaml()


def test_misspelt_key_names_line_path_and_suggestion(tmp_path):
    text = GOOD.replace("    language_model: {drop_top: 2}", "    language_model: {drop_tpo: 2}")
    (p,) = problems(tmp_path, text)
    assert ":15:" in p, p
    assert "stages.3.language_model.drop_tpo" in p
    assert "Did you mean 'drop_top'?" in p


def test_all_errors_reported_at_once_with_lines(tmp_path):
    text = GOOD.replace("model: tiny-blip2-opt", "model: tiny-blip2-opt\ndtpye: float32").replace(
        "type: merge_adapters", "type: merge_adapter"
    ).replace("rules: {cider:", "rules: {cidr:")
    ps = problems(tmp_path, text)
    assert len(ps) == 3, ps
    assert ":3: dtpye" in ps[0] and "Did you mean 'dtype'?" in ps[0]
    assert "unknown stage type 'merge_adapter'" in ps[1] and "Did you mean 'merge_adapters'?" in ps[1]
    assert "unknown gate key 'cidr'" in ps[2] and "Did you mean 'cider'?" in ps[2]


def test_set_override_nested_and_list_index(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD), ["stages.0.train.steps=7", "generation.num_beams=3", "stages.3.language_model={drop_top: 1}"])
    assert loaded.recipe.stages[0].train.steps == 7
    assert loaded.recipe.generation.num_beams == 3
    assert loaded.recipe.stages[3].language_model.drop_top == 1
    assert loaded.lines[("stages", 0, "train", "steps")] == "--set stages.0.train.steps=7"


def test_set_override_checked_by_schema(tmp_path):
    (p,) = problems(tmp_path, GOOD, ["stages.0.train.stpes=3"])
    assert p.startswith("--set stages.0.train.stpes=3")
    assert "Did you mean 'steps'?" in p


def test_set_override_bad_index(tmp_path):
    with pytest.raises(RecipeError, match="has 5 items"):
        load_recipe(write(tmp_path, GOOD), ["stages.9.train.steps=3"])


def test_apply_override_parses_yaml_values():
    data = {"a": {"b": 1}, "l": [{"x": 1}]}
    apply_override(data, "a.c=[1, 2]")
    apply_override(data, "l.0.x=null")
    apply_override(data, "a.d=true")
    assert data == {"a": {"b": 1, "c": [1, 2], "d": True}, "l": [{"x": None}]}


def test_yaml_syntax_error_has_line(tmp_path):
    (p,) = problems(tmp_path, "name: t\nmodel: [unclosed\nstages: []\n")
    assert "not valid YAML" in p and ":3" in p


def test_duplicate_key_is_an_error(tmp_path):
    ps = problems(tmp_path, GOOD.replace("name: t\n", "name: t\nname: u\n"))
    assert any("key given twice" in p for p in ps)


def test_cross_stage_checks(tmp_path):
    text = GOOD.replace("  - type: merge_adapters\n", "").replace("candidate: candidate\n  baseline: baseline", "candidate: cand\n  baseline: baseline")
    ps = problems(tmp_path, text)
    assert any("merge the LoRA adapter before remove_layers" in p for p in ps), ps
    assert any("gate.candidate" in p and "Did you mean 'candidate'?" in p for p in ps), ps


def test_distill_teacher_must_be_an_earlier_label(tmp_path):
    text = GOOD.replace(
        "  - type: evaluate\n    label: candidate",
        "  - type: heal\n    loss: distill\n    distill: {teacher: baselin}\n    parts: [language_model.attention]\n"
        "  - type: merge_adapters\n  - type: evaluate\n    label: candidate",
    )
    (p,) = problems(tmp_path, text)
    assert "distill.teacher" in p and "Did you mean 'baseline'?" in p


def test_layer_selection_needs_exactly_one(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("{drop_top: 2}", "{drop_top: 2, layers: [1]}"))
    assert "exactly one of drop_top, layers, count" in p


def test_missing_file_suggests_name(tmp_path):
    write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match="Did you mean 'r.yaml'"):
        load_recipe(tmp_path / "r.yml")


def test_lora_keys_are_peft_lora_config_fields():
    import dataclasses

    from peft import LoraConfig

    from compressor.recipe.schema import LoraSpec

    peft_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(LoraSpec.model_fields) <= peft_fields


def test_generated_docs_are_current():
    from compressor.recipe.docs import TARGETS, stale

    assert set(TARGETS) == {"README.md", "docs/recipe.md", "docs/cli.md"}
    assert stale() == [], "generated docs are stale: run `make docs`"


def _copy_generated_docs(dst):
    from compressor.recipe.docs import ROOT, TARGETS

    for rel in TARGETS:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text((ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")


@pytest.mark.parametrize(
    "rel,block",
    [("README.md", "stage-table"), ("README.md", "command-table"), ("docs/recipe.md", "recipe-reference"),
     ("docs/cli.md", "cli-reference")],
)
def test_the_staleness_check_fails_on_a_drifted_copy(tmp_path, rel, block):
    from compressor.recipe.docs import main, stale, write

    _copy_generated_docs(tmp_path)
    assert stale(tmp_path) == []
    path = tmp_path / rel
    current = path.read_text(encoding="utf-8")
    start = current.index(f"<!-- {block}:start -->")
    end = current.index(f"<!-- {block}:end -->")
    lines = current[start:end].splitlines(keepends=True)
    assert len(lines) > 3, f"the {block} block of {rel} is empty"
    lines[len(lines) // 2] = lines[len(lines) // 2].rstrip("\n") + " (drifted)\n"  # one generated line changed
    path.write_text(current[:start] + "".join(lines) + current[end:], encoding="utf-8")
    assert stale(tmp_path) == [rel]
    assert write(tmp_path) == [rel] and path.read_text(encoding="utf-8") == current
    assert stale(tmp_path) == [] and main(["--check"]) == 0  # the repository's own files are current


def test_stage_table_and_reference_come_from_stage_sections(monkeypatch):
    from pydantic import BaseModel

    from compressor.recipe import docs

    class ThrowAwayStage(BaseModel):
        """Does nothing, for this test."""

    sections = [docs.StageSection("throw_away", ThrowAwayStage, "Does nothing, for this test.")]
    monkeypatch.setattr(docs, "stage_sections", lambda: sections)
    assert docs.stage_table().splitlines()[2:] == [
        "| [`throw_away`](docs/recipe.md#stages-type-throw_away) | Does nothing, for this test. |"
    ]
    assert "#### stages: type: throw_away" in docs.recipe_reference()
    assert "#### stages: type: heal" not in docs.recipe_reference()


def test_stage_sections_cover_every_stage_type_with_its_docstring():
    from compressor.recipe.docs import stage_sections
    from compressor.recipe.schema import STAGE_TYPES

    sections = stage_sections()
    assert [s.type for s in sections] == list(STAGE_TYPES)
    for s in sections:
        assert s.config.model_fields["type"].annotation.__args__ == (s.type,)
        assert s.description and s.description == s.config.__doc__.strip().splitlines()[0]
