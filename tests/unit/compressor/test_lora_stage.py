"""LoRA: part-scoped names match exactly the modules they should in every family (T5 and BLIP
included), an entry matching nothing exits 2, QLoRA without CUDA exits 2, labels mask image,
padding and prompt tokens (VQA: question as prompt), evaluation every N steps keeps the best
checkpoint, and training resumes from a saved adapter."""

from __future__ import annotations

import json

import pytest
from surgery_helpers import FAMILIES, make_recipe, preset, probe_images, run_stage, saved_preset

from compressor.errors import UserInputError
from compressor.lora import apply_lora, check_targets_on_config
from compressor.models.batches import build_prompt, training_batch
from compressor.recipe.schema import LoraSpec

# Modules each part-scoped name must wrap, per preset: layers × modules per layer (presets.py).
EXPECTED = {
    "tiny-blip2-opt": {"vision.attention": 4, "vision.mlp": 4, "qformer.self_attention": 12, "qformer.cross_attention": 6,
                       "qformer.mlp": 8, "projection": 1, "language_model.attention": 24, "language_model.mlp": 12},
    "tiny-blip2-llama": {"qformer.self_attention": 12, "language_model.attention": 24, "language_model.mlp": 18},
    "tiny-blip2-t5": {"language_model.attention": 48, "language_model.mlp": 24, "language_model.encoder.attention": 16,
                      "language_model.encoder.mlp": 12, "language_model.decoder.attention": 16,
                      "language_model.decoder.cross_attention": 16, "language_model.decoder.mlp": 12},
    "tiny-instructblip": {"qformer.self_attention": 12, "qformer.cross_attention": 6, "qformer.mlp": 16,
                          "language_model.attention": 24, "language_model.mlp": 12},
    "tiny-blip": {"vision.attention": 4, "vision.mlp": 4, "language_model.attention": 12,
                  "language_model.decoder.attention": 12, "language_model.decoder.cross_attention": 12,
                  "language_model.mlp": 8},
}
PART_OF = {"vision": "vision", "qformer": "qformer", "projection": "projection", "language_model": "language_model"}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_part_name_matches_its_modules_and_only_its_part(name):
    model, _, family = preset(name)
    for entry, count in EXPECTED[name].items():
        report = check_targets_on_config(model.config, LoraSpec(r=2), [entry])
        assert report["entries"][entry] == {PART_OF[entry.split(".")[0]]: count}, entry
    # Every name the family offers matches something.
    for entry in family.lora:
        assert sum(check_targets_on_config(model.config, LoraSpec(r=2), [entry])["entries"][entry].values()) > 0, entry


def test_fc1_fc2_scoped_to_their_part():
    """`fc1`/`fc2` exist in the vision MLP and the OPT MLP: the scoped names keep them apart."""
    model, _, _ = preset("tiny-blip2-opt")
    report = check_targets_on_config(model.config, LoraSpec(r=2), ["language_model.mlp", "vision.mlp"])
    assert report["entries"] == {"language_model.mlp": {"language_model": 12}, "vision.mlp": {"vision": 4}}
    bare = check_targets_on_config(model.config, LoraSpec(r=2, target_modules=["fc1", "fc2"]), [])
    assert bare["by_part"] == {"vision": 4, "language_model": 12}


def test_report_counts_parameters():
    model, _, _ = preset("tiny-blip2-opt")
    peft_model, report = apply_lora(model, LoraSpec(r=4, lora_alpha=8), ["qformer.self_attention"])
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert report["params_trainable"] == lora > 0
    assert report["params_total"] == sum(p.numel() for p in peft_model.parameters())


def test_entry_matching_nothing_exits_2():
    model, _, _ = preset("tiny-blip2-opt")
    with pytest.raises(UserInputError, match="target_modules matched no module") as err:
        check_targets_on_config(model.config, LoraSpec(r=2, target_modules=["no_such_linear"]), ["language_model.attention"])
    assert err.value.exit_code == 2
    with pytest.raises(UserInputError, match="does not exist in a blip2 model with a opt"):
        check_targets_on_config(model.config, LoraSpec(r=2), ["language_model.decoder.cross_attention"])
    with pytest.raises(UserInputError, match="layers_to_transform"):
        check_targets_on_config(model.config, LoraSpec(r=2, layers_to_transform=[1]), ["qformer.cross_attention"])


def test_qlora_without_cuda_exits_2():
    from compressor.stages.lora_finetune import LoraFinetuneStage, check_quantization

    st = LoraFinetuneStage(type="lora_finetune", parts=["language_model.attention"], quantization={"bits": 4})
    with pytest.raises(UserInputError, match="needs a CUDA GPU") as err:
        check_quantization(st, "cpu")
    assert err.value.exit_code == 2


# ------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("name", FAMILIES)
def test_labels_mask_image_padding_and_prompt(name):
    _, proc, family = preset(name)
    tok = proc.tokenizer
    question = "what color is the circle?"
    prompts = ["", build_prompt(None, question)]
    targets = ["a red circle", "two blue squares on the left"]
    batch = training_batch(family, proc, probe_images(2), targets, prompts)
    labels, ids = batch["labels"], batch["input_ids"]
    eos = tok.eos_token if family.name != "blip" else tok.sep_token
    for i, target in enumerate(targets):
        kept = labels[i][labels[i] != -100]
        # Exactly the target and its end token are learnt: no image, padding, BOS or prompt token.
        assert tok.decode(kept).replace(" ", "") == (target + eos).replace(" ", "")
    if family.decoder_only:
        assert labels.shape == ids.shape
        assert (labels[batch["attention_mask"] == 0] == -100).all()
        image_id = tok.convert_tokens_to_ids("<image>")
        if family.name != "blip":
            assert (ids == image_id).sum() > 0 and (labels[ids == image_id] == -100).all()
        # VQA: the question is in the input, as the prompt, and not learnt.
        assert question.split()[0] in tok.decode(ids[1]).lower()
    else:  # T5: the encoder reads image tokens and the question; the decoder learns the answer.
        assert "what color" in tok.decode(ids[1])
        assert "what color" not in tok.decode(labels[1][labels[1] != -100])
    if family.extra.get("qformer_text"):  # InstructBLIP: the Q-Former reads the instruction, never the target
        q = proc.qformer_tokenizer.decode(batch["qformer_input_ids"][1])
        assert "what color" in q and "squares" not in q


def test_vqa_data_trains_on_answers_with_question_prompts(tmp_path):
    """End to end through the stage glue: VQA examples become (question prompt, answer) batches."""
    from compressor.training_glue import batch_maker

    recipe = make_recipe([{"type": "evaluate", "label": "x"}],
                         data={"format": "synthetic", "task": "vqa", "train": {"size": 2, "image_size": 32}})
    from compressor.data import load_section

    pairs = load_section(recipe.data, "train").training_pairs()
    model, proc, family = preset("tiny-blip2-opt")
    batch = batch_maker(model, proc, None)(pairs[:3])
    tok = proc.tokenizer
    for i, (ex, answer) in enumerate(pairs[:3]):
        assert ex.question in tok.decode(batch["input_ids"][i])
        kept = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(kept).strip() == f"{answer}</s>".strip()


# ------------------------------------------------------------------------------------------ stage


def _lora_hash(model) -> list[float]:
    return [float(p.detach().double().sum()) for n, p in sorted(model.named_parameters()) if "lora_B" in n]


def test_eval_every_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    """Evaluation every 2 steps; the scripted metric peaks at step 4 of 6: that adapter is the one kept."""
    import compressor.training_glue as tg

    seen = {}
    script = {2: 10.0, 4: 30.0, 6: 20.0}

    def fake_eval_hook(ctx, processor, train_spec, metrics=None):
        calls = []

        def evaluate(model):
            calls.append(1)
            step = 2 * len(calls)
            seen[step] = _lora_hash(model)
            return {"cider": script[step]}

        return evaluate

    monkeypatch.setattr(tg, "eval_hook", fake_eval_hook)
    recipe = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"], "lora": {"r": 4},
                           "train": {"steps": 6, "batch_size": 4, "learning_rate": 5e-3, "eval_every": 2,
                                     "select_best_by": "cider"}}])
    out = tmp_path / "stage"
    summary = run_stage(recipe, 0, saved_preset("tiny-blip2-opt"), out)
    assert summary["best_step"] == 4
    loss = json.loads((out / "loss.json").read_text())
    assert [s for s, _ in loss["evals"]] == [2, 4, 6] and loss["best_step"] == 4
    assert len(loss["loss"]) == 6 and (out / "loss.png").stat().st_size > 0
    assert not (out / "best").exists()
    # The saved adapter is step 4's, not the last step's.
    from peft import PeftModel

    from compressor.models.loading import load_model

    base, _ = load_model(out / "model")
    kept = _lora_hash(PeftModel.from_pretrained(base, str(out / "model" / "adapter")))
    assert kept == pytest.approx(seen[4], rel=1e-6) and kept != pytest.approx(seen[6], rel=1e-6)
    assert json.loads((out / "matches.json").read_text())["entries"] == {"language_model.attention": {"language_model": 24}}


def test_real_eval_hook_scores_captions(tmp_path):
    recipe = make_recipe([{"type": "lora_finetune", "parts": ["qformer.self_attention"], "lora": {"r": 2},
                           "train": {"steps": 2, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 1,
                                     "eval_limit": 2, "select_best_by": "bleu_4"}}])
    out = tmp_path / "stage"
    summary = run_stage(recipe, 0, saved_preset("tiny-blip2-opt"), out)
    evals = json.loads((out / "loss.json").read_text())["evals"]
    assert [s for s, _ in evals] == [1, 2] and all("bleu_4" in m for _, m in evals)
    assert summary["best_step"] in (1, 2)


def test_resume_from_adapter_continues_training(tmp_path):
    first = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"], "lora": {"r": 4},
                          "train": {"steps": 8, "batch_size": 4, "learning_rate": 1e-2}}])
    a = tmp_path / "a"
    s1 = run_stage(first, 0, saved_preset("tiny-blip2-opt"), a)
    resumed = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"],
                            "train": {"steps": 2, "batch_size": 4, "learning_rate": 1e-2, "resume_from": str(a / "model")}}])
    b = tmp_path / "b"
    s2 = run_stage(resumed, 0, saved_preset("tiny-blip2-opt"), b)
    assert s2["lora"]["resumed_from"] == str(a / "model" / "adapter")
    assert s2["lora"]["by_part"] == {"language_model": 24}
    fresh = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"], "lora": {"r": 4},
                          "train": {"steps": 2, "batch_size": 4, "learning_rate": 1e-2}}])
    s3 = run_stage(fresh, 0, saved_preset("tiny-blip2-opt"), tmp_path / "c")
    # Resumed training starts where the first run ended, well below a fresh adapter's first loss.
    assert s1["loss_last"] < s1["loss_first"]
    assert s2["loss_first"] < s3["loss_first"] - 0.1
    assert abs(s2["loss_first"] - s1["loss_last"]) < abs(s3["loss_first"] - s1["loss_last"])


def test_resume_from_a_folder_without_adapter_exits_2(tmp_path):
    from compressor.lora import resolve_adapter

    with pytest.raises(UserInputError, match="holds no LoRA adapter"):
        resolve_adapter(tmp_path)


def test_trained_adapter_changes_outputs(tmp_path):
    """The stage's adapter is a real change (teeth for the merge tests)."""
    from peft import PeftModel
    from surgery_helpers import logits

    from compressor.models.loading import load_model

    recipe = make_recipe([{"type": "lora_finetune", "parts": ["qformer.cross_attention", "language_model.attention"],
                           "lora": {"r": 4}, "train": {"steps": 3, "batch_size": 4, "learning_rate": 5e-3}}])
    out = tmp_path / "s"
    run_stage(recipe, 0, saved_preset("tiny-blip2-opt"), out)
    base, proc = load_model(out / "model")
    _, _, family = preset("tiny-blip2-opt")
    ref = logits(base, proc, family, probe_images())
    tuned = PeftModel.from_pretrained(base, str(out / "model" / "adapter"))
    assert float((logits(tuned, proc, family, probe_images()) - ref).abs().max()) > 1e-3
    # The stage's model/ is the input model itself (hard links), only the adapter is new.
    assert (out / "model" / "model.safetensors").stat().st_ino == (saved_preset("tiny-blip2-opt") / "model.safetensors").stat().st_ino
