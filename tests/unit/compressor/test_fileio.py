"""Atomic writes, hard-linked trees and folder publication: a failure never leaves a complete-looking file."""

from __future__ import annotations

import os

import pytest

from compressor.fileio import atomic_write_text, hash_files, link_tree, make_tmp_dir, publish_dir


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_link_tree_hard_links_and_skips(tmp_path):
    src = tmp_path / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"x" * 100)
    (src / "adapter" / "a.bin").write_bytes(b"y")
    dst = tmp_path / "dst"
    link_tree(src, dst, skip=("adapter",))
    assert (dst / "w.bin").stat().st_ino == (src / "w.bin").stat().st_ino
    assert not (dst / "adapter").exists()


def test_publish_dir_swaps_complete_folders(tmp_path):
    final = tmp_path / "final"
    for content in ("v1", "v2"):
        tmp = make_tmp_dir(tmp_path, "final")
        (tmp / "f").write_text(content)
        publish_dir(tmp, final)
    assert (final / "f").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_hash_files_ignores_tmp_and_detects_changes(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / ".tmp-x").mkdir()
    (tmp_path / ".tmp-x" / "b").write_text("2")
    h1 = hash_files(tmp_path)
    assert list(h1) == ["a"]
    (tmp_path / "a").write_text("2")
    assert hash_files(tmp_path) != h1


def test_tmp_dirs_and_plots_get_the_usual_modes(tmp_path):
    """mkdtemp/mkstemp make 0700/0600; outputs must be as readable as a plain mkdir/open makes them."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compressor.fileio import make_tmp_dir
    from eval.plots import save_png

    mask = os.umask(0o022)
    try:
        d = make_tmp_dir(tmp_path, "x")
        assert d.stat().st_mode & 0o777 == 0o755
        fig = plt.figure()
        p = save_png(fig, tmp_path / "a.png")
        plt.close(fig)
        assert p.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
