"""Older-style BLIP-2 folders (issue 20, item 1; transformers#34223, #42203): a processor config
without ``num_query_tokens`` captioned every image as "" with exit 0; a config.json without
``image_token_index`` or ``num_query_tokens`` exited 3. The family completes the missing field from
the other file (with a warning) or refuses with exit 2 naming the field; no captioner ever
captions a row without its image tokens."""

from __future__ import annotations

import json
import shutil

import pytest

from compressor.errors import ModelSpecError
from tests.integration.inprocess import run_inprocess


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The shipped shapes teacher (it really captions the shapes) and 4 labelled shapes images."""
    from compressor.data.synthetic import write_files
    from compressor.models.presets import SHIPPED

    root = tmp_path_factory.mktemp("old-style")
    shutil.copytree(SHIPPED["shapes-teacher"], root / "orig")
    data = write_files(root / "data", 4, seed=1)
    return root, data


def _variant(root, name: str, file: str, *keys: str):
    dst = root / name
    if not dst.exists():
        shutil.copytree(root / "orig", dst)
        for f in (file,) if isinstance(file, str) else file:
            d = json.loads((dst / f).read_text())
            for k in keys:
                d.pop(k, None)
            (dst / f).write_text(json.dumps(d))
    return dst


def _predict(folder, data, out):
    res = run_inprocess("predict", str(folder), "--data", str(data), "--out", str(out))
    caps = [r["caption"] for r in json.loads(out.read_text())] if out.is_file() else None
    return res, caps


@pytest.mark.parametrize("file,key,says", [
    ("processor_config.json", "num_query_tokens", "processor_config.json has no num_query_tokens: using the model config's 8"),
    ("config.json", "image_token_index", "config.json has no image_token_index: using 4"),
    ("config.json", "num_query_tokens", "config.json has no num_query_tokens: using 8 from the processor"),
])
def test_old_style_folder_captions_like_the_original(teacher, file, key, says):
    root, data = teacher
    ref_res, ref = _predict(root / "orig", data, root / "orig.json")
    assert ref_res.returncode == 0 and len(set(ref)) >= 3 and all(ref), ref  # teeth: real, different captions
    folder = _variant(root, f"no-{key}-{file}", file, key)
    res, caps = _predict(folder, data, root / f"{folder.name}.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert caps == ref
    assert says in res.stderr and "older-style" in res.stderr


def test_num_query_tokens_missing_from_both_files_comes_from_the_weights(teacher):
    from compressor.models.loading import load_model

    root, _ = teacher
    folder = _variant(root, "no-nq-both", ("config.json", "processor_config.json"), "num_query_tokens")
    model, proc = load_model(folder)
    assert model.config.num_query_tokens == 8 and proc.num_query_tokens == 8


def test_disagreeing_or_unrecoverable_fields_exit_2(teacher):
    root, data = teacher
    bad = _variant(root, "disagree", "processor_config.json")
    d = json.loads((bad / "processor_config.json").read_text())
    d["num_query_tokens"] = 5
    (bad / "processor_config.json").write_text(json.dumps(d))
    res, _ = _predict(bad, data, root / "bad.json")
    assert res.returncode == 2 and "num_query_tokens 5" in res.stderr and "config.json" in res.stderr
    assert not (root / "bad.json").exists()
    # no image_token_index and a tokenizer without <image>: nothing to fill it from
    notok = _variant(root, "no-image-token", "config.json", "image_token_index")
    tok = json.loads((notok / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image>"]
    tok["model"]["vocab"].pop("<image>")
    (notok / "tokenizer.json").write_text(json.dumps(tok))
    from compressor.models.loading import load_model

    with pytest.raises(ModelSpecError, match="image_token_index"):
        load_model(notok, with_processor=False)


def test_captioner_refuses_a_batch_without_image_tokens():
    """The guard both captioners share: a processor that inserts no <image> token is refused, not captioned."""
    from compressor.evaluation.captioner import TorchCaptioner
    from compressor.models.presets import build_preset
    from compressor.recipe.schema import GenerationSpec
    from tests.unit.compressor.surgery_helpers import probe_images

    model, proc = build_preset("tiny-blip2-opt")
    cap = TorchCaptioner(model, proc, GenerationSpec(max_new_tokens=3))
    assert len(cap.caption(probe_images(2))) == 2
    proc.num_query_tokens = None  # as an older processor config loads when nothing completes it
    with pytest.raises(ModelSpecError, match=r"put \[0\] image token\(s\) per row but the model reads 8"):
        cap.caption(probe_images(2))
