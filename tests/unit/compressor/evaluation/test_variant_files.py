"""The deployed size of an ONNX export counts the graphs its variant runs, not every copy."""

from __future__ import annotations

from compressor.evaluation import variant_files
from eval.characteristics import size_on_disk_mb


def test_variant_files_keep_the_used_graphs_their_data_and_the_support_files(tmp_path):
    sizes = {
        "decoder.onnx": 100, "decoder.onnx.data": 1000, "decoder.opt.onnx": 90, "decoder.opt.onnx.data": 900,
        "decoder.int8.onnx": 40, "image_encoder.onnx": 50, "image_encoder.opt.onnx": 45,
        "export.json": 3, "tokenizer.json": 7, "config.json": 2,
    }
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    used = {"decoder": "decoder.opt.onnx", "image_encoder": "image_encoder.opt.onnx"}
    got = sorted(p.name for p in variant_files(tmp_path, used))
    assert got == sorted(["decoder.opt.onnx", "decoder.opt.onnx.data", "image_encoder.opt.onnx",
                          "export.json", "tokenizer.json", "config.json"])
    assert size_on_disk_mb(variant_files(tmp_path, used)) * 1e6 == 90 + 900 + 45 + 3 + 7 + 2
    # without a captioner's choice, the whole folder
    assert len(variant_files(tmp_path, None)) == len(sizes)


def test_busy_machine_note():
    from compressor.evaluation import busy_machine_note

    assert busy_machine_note(load=1.5, cores=2) is None
    note = busy_machine_note(load=4.2, cores=2)
    assert note is not None and "4.2" in note and "2 cores" in note
