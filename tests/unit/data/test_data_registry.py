"""The format registry: formats declare themselves, the loader and the schema only read declarations."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

from compressor.data import formats as registry

REPO = Path(__file__).resolve().parents[3]


def _python(code: str, *paths: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_every_registered_module_declares_its_format_and_the_schema_lists_them():
    from compressor.recipe.schema import DataFormat

    names = registry.format_names()
    assert names == ("coco", "karpathy", "csv", "imagefolder", "hf", "synthetic")  # the order DESIGN.md lists (+ hf)
    assert typing.get_args(DataFormat) == names
    for fmt in registry.formats():
        assert "limit" in fmt.fields and fmt.example.startswith("{")
        assert (fmt.detect is None) or (fmt.path_source is not None)


def test_loader_sections_and_infer_never_test_a_format_name():
    from compressor.data import infer, loader, sections

    for module in (loader, sections, infer):
        source = inspect.getsource(module)
        for name in registry.format_names():
            assert f'"{name}"' not in source and f"'{name}'" not in source, (module.__name__, name)


def test_schema_imports_the_registry_without_pil_torch_or_format_modules():
    r = _python(
        """
        import sys
        import compressor.recipe.schema
        heavy = [m for m in ("PIL", "torch", "compressor.data.formats.coco", "compressor.data.loader") if m in sys.modules]
        print(heavy)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_new_format_is_one_module_plus_one_registry_line(tmp_path):
    """A throw-away ``tsv`` format (``image<TAB>caption``) goes through the schema, loader and --data."""
    (tmp_path / "tsv_format.py").write_text(
        textwrap.dedent(
            '''
            from compressor.data.dataset import Example
            from compressor.data.formats import Format
            from compressor.data.formats.common import (
                EMPTY, Parsed, Problem, Row, clean_text, image_id_for, images_beside, need, need_dir,
                need_file, resolve_in,
            )

            def read(src, key, task, settings):
                path = need(src.annotations, key, "annotations", "{annotations: a.tsv, images: im/}")
                root = need(src.images, key, "images", "{annotations: a.tsv, images: im/}")
                need_file(path, key)
                need_dir(root, key)
                out = Parsed(files=[path], image_root=root)
                for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), start=1):
                    name, _, caption = line.partition("\\t")
                    ipath, text = resolve_in(root, name), clean_text(caption)
                    if text is None:
                        out.problems.append(Problem(EMPTY, f"a.tsv line {n}"))
                        continue
                    ex = Example(image_id=image_id_for(root, ipath), captions=(text,), image_path=ipath)
                    out.rows.append(Row(ex, f"a.tsv line {n}"))
                return out

            FORMAT = Format(
                name="tsv",
                fields=frozenset({"annotations", "images", "limit"}),
                example="{annotations: a.tsv, images: im/}",
                read=read,
                detect=lambda path: 1 if path.endswith(".tsv") else 0,
                path_source=lambda path, images: {"annotations": path, "images": images_beside(path, images)},
            )
            '''
        )
    )
    data = tmp_path / "d"
    data.mkdir()
    from PIL import Image

    for i, name in enumerate(["b.png", "a.png"]):
        Image.new("RGB", (4, 4), (i * 90, 10, 10)).save(data / name)
    (data / "caps.tsv").write_text("b.png\ta bee\na.png\tan ant\n")
    r = _python(
        f"""
        import compressor.data.formats as registry
        registry.REGISTRY["tsv"] = "tsv_format"  # the one registry line

        from compressor.data import infer_spec, load_section, section_fingerprint
        from compressor.errors import UserInputError
        from compressor.recipe.schema import DataSpec

        spec = DataSpec(format="tsv", test={{"annotations": {str(data / "caps.tsv")!r}, "images": {str(data)!r}}})
        ds = load_section(spec, "eval")
        print([(e.image_id, e.captions) for e in ds])
        assert ds.fingerprint == section_fingerprint(spec, "eval")
        inferred = infer_spec({str(data / "caps.tsv")!r})
        print(inferred.format, len(load_section(inferred, "test")))
        try:
            load_section(DataSpec(format="tsv", test={{"path": "x"}}), "test")
        except UserInputError as e:
            print(e)
        try:
            load_section(DataSpec(format="tsv", train={{"annotations": "x"}}), "eval")
        except UserInputError as e:
            print(e)
        try:
            infer_spec({str(data / "a.png")!r})
        except UserInputError as e:
            print(e)
        """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[('a', ('an ant',)), ('b', ('a bee',))]"
    assert lines[1] == "tsv 2"
    assert lines[2].startswith("data.test: path do(es) not apply to format tsv (it reads annotations, images, limit)")
    assert lines[3].endswith("Add `data.eval: {annotations: a.tsv, images: im/}` to the recipe.")
    assert lines[4].endswith("give --data-format coco|karpathy|csv|imagefolder|hf|tsv")
