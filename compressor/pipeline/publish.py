"""The upload folder and the push (the recipe's ``push:`` and ``compress push``).

``runs/<name>/push/`` is exactly what goes to the Hub, written before any network call (and all
a dry run does): the final model (or the last LoRA adapter) as hard links, the resolved recipe,
the run's plots under ``plots/``, the ONNX export under ``onnx/`` when the run made one (models
only), and the model card as ``README.md`` (:mod:`exporters.model_card`). Then
:func:`exporters.hub.push_folder` uploads that folder in one commit. A failed gate never gets
here (the runner raises first); ``compress push`` refuses a run whose gate failed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from compressor.errors import UserInputError
from compressor.fileio import atomic_write_text, link_tree, make_tmp_dir, publish_dir

log = logging.getLogger(__name__)

#: Licence of the presets and the shipped teacher (their weights are made by this project).
PROJECT_LICENSE = "apache-2.0"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def base_model_info(run_dir: Path) -> dict[str, Any]:
    """What the card says about the base model, from the run's ``manifest.json``.

    Returns:
        ``{"base_model": hub id or None, "desc": sentence, "license": id or None}``; the
        licence is read from the base model's own card when it has one locally, and is the
        project's for presets and the shipped teacher.
    """
    model = _read_json(Path(run_dir) / "manifest.json").get("model", {})
    kind, key, path = model.get("kind"), str(model.get("key", "")), model.get("path")
    info: dict[str, Any] = {"base_model": None, "desc": None, "license": None}
    if kind == "hub":
        info["base_model"] = key.split(":", 1)[1] if ":" in key else key
    elif kind == "preset":
        name = key.split(":")[1] if ":" in key else key
        info["desc"] = f"the vlm-compress preset `{name}`"
        info["license"] = PROJECT_LICENSE
    elif kind == "folder":
        info["desc"] = f"a local model folder (`{Path(key.split(':', 1)[-1]).name}`)"
    elif kind in ("config", "assemble"):
        info["desc"] = f"a model {'assembled from parts' if kind == 'assemble' else 'built from a config'} by vlm-compress"
    if path and (Path(path) / "README.md").is_file():
        try:
            from huggingface_hub import ModelCard

            data = ModelCard.load(Path(path) / "README.md").data
            info["license"] = info["license"] or data.license
            if info["base_model"] is None and isinstance(data.base_model, str) and kind == "folder":
                info["desc"] = f"a local copy of `{data.base_model}`"
        except Exception as exc:  # noqa: BLE001 - a broken upstream card only loses the licence
            log.debug("could not read the base model's card: %s", exc)
    return info


def _source(run_dir: Path, what: str) -> tuple[Path, str | None]:
    if what == "adapter":
        adapters = sorted((run_dir / "stages").glob("*/model/adapter"))
        if not adapters:
            raise UserInputError(f"{run_dir}: push what=adapter, but no stage of this run wrote a LoRA adapter")
        src = adapters[-1]
        stage_dir = src.parent.parent.name  # NN-type-key
        idx = int(stage_dir.split("-")[0])
        from compressor.stages import REGISTRY, declaration

        removal = [s for s in _read_json(run_dir / "manifest.json").get("stages", [])
                   if s.get("type") in REGISTRY and declaration(s["type"]).reshapes and s.get("index", 99) < idx]
        note = None
        if removal:
            note = (f"This adapter was trained on the model after stage {removal[-1]['index']} "
                    f"(`{removal[-1]['type']}`), not on the base model: build that model first "
                    "(the recipe below, up to that stage) and load the adapter onto it.")
        return src, note
    src = run_dir / "final"
    if not src.is_dir():
        raise UserInputError(f"{run_dir}: no final/ model folder; run the recipe to the end first")
    return src, None


def build_upload_folder(
    run_dir: Path,
    *,
    repo_id: str,
    what: str = "model",
    license: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    out: Path | None = None,
) -> Path:
    """Write the upload folder of a finished run (atomically: built aside, then renamed).

    Args:
        run_dir: ``runs/<name>`` with ``report.json``, ``recipe.resolved.yaml``, ``final/``.
        repo_id: the target repository (named in the card).
        what: ``model`` (``final/`` + ``onnx/``) or ``adapter`` (the last LoRA adapter).
        license: the card's licence (default: the base model's, if known).
        datasets: Hub dataset ids for the card.
        out: the folder to write (default ``run_dir/push``).

    Returns:
        The upload folder.

    Raises:
        UserInputError: no final model / no adapter in the run.
    """
    from exporters.hub import upload_file_list
    from exporters.model_card import build_model_card

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "push"
    src, adapter_note = _source(run_dir, what)
    report = _read_json(run_dir / "report.json")
    recipe_yaml = (run_dir / "recipe.resolved.yaml").read_text() if (run_dir / "recipe.resolved.yaml").is_file() else None
    info = base_model_info(run_dir)
    tmp = make_tmp_dir(out.parent, out.name)
    try:
        link_tree(src, tmp, skip=("README.md",))
        if recipe_yaml is not None:
            atomic_write_text(tmp / "recipe.resolved.yaml", recipe_yaml)
        if what == "model" and (run_dir / "onnx").is_dir():
            link_tree(run_dir / "onnx", tmp / "onnx")
        plots = []
        from eval.plots import RUN_PLOTS

        for name in RUN_PLOTS:
            if (run_dir / name).is_file():
                link_tree_file(run_dir / name, tmp / "plots" / name)
                plots.append(f"plots/{name}")
        files = sorted(set(upload_file_list(tmp)) | {"README.md"})
        card = build_model_card(
            report,
            repo_id=repo_id,
            what=what,
            recipe_yaml=recipe_yaml,
            base_model=info["base_model"],
            base_model_desc=info["desc"],
            license=license or info["license"],
            datasets=list(datasets),
            config=_read_json(src / "config.json") or _read_json(run_dir / "final" / "config.json"),
            files=files,
            onnx_files=[f for f in files if f.endswith(".onnx")],
            plots=plots,
            adapter_note=adapter_note,
            stage_notes=stage_card,
        )
        if not (license or info["license"]):
            log.warning("the model card has no licence: set push.license (or --license)")
        atomic_write_text(tmp / "README.md", str(card))
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, out)


def stage_card(record: dict) -> dict:
    """What the model card says of one stage record, from the stage's declaration: its one-line
    ``description``, ``details`` on its line, metadata ``tags`` and ``limitations``."""
    from compressor.stages import card_notes, describe

    notes = card_notes(record)
    return {
        "description": describe(record.get("type", "")),
        "details": notes.details,
        "tags": notes.tags,
        "limitations": notes.limitations,
        "loading": notes.loading,
    }


def link_tree_file(src: Path, dst: Path) -> None:
    """Hard-link one file (copy across file systems)."""
    import os
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def push_folder_summary(folder: Path, repo_id: str, dry_run: bool) -> dict:
    """The report's ``push`` entry for a dry run: the folder and its files."""
    from exporters.hub import upload_file_list

    files = upload_file_list(folder)
    return {
        "dry_run": dry_run,
        "repo_id": repo_id,
        "folder": str(folder),
        "files": files,
        "summary": f"dry run: {len(files)} files in `{folder}` would be uploaded to `{repo_id}`",
    }


def push_run(recipe, run_dir: Path, report: dict, loaded) -> dict:
    """Write the upload folder; upload it unless ``push.dry_run``. Returns a summary for the report.

    Raises:
        HubAuthError, HubNetworkError, HubError: from :func:`exporters.hub.push_folder`.
    """
    spec = recipe.push
    folder = build_upload_folder(run_dir, repo_id=spec.repo_id, what=spec.what, license=spec.license,
                                 datasets=spec.datasets)
    if spec.dry_run:
        summary = push_folder_summary(folder, spec.repo_id, True)
        log.info("push dry run: %d files in %s would go to %s", len(summary["files"]), folder, spec.repo_id)
        return summary
    from compressor.errors import CompressError
    from exporters.hub import push_folder

    try:
        return push_folder(folder, spec, recipe_name=recipe.name, recipe_hash=loaded.hash())
    except CompressError as exc:
        from compressor.pipeline.report import write_report

        report["push"] = {**push_folder_summary(folder, spec.repo_id, False), "failed": True, "summary": f"push failed: {exc}"}
        write_report(run_dir, report, plots=False)
        raise
