"""``compress push DIR --repo-id ID``: upload a run's model (or adapter) with its model card.

DIR is a run directory (``runs/<name>``), its ``final/`` folder, or any save_pretrained model
or peft adapter folder. The upload folder is written first (``<run>/push`` by default; for a
folder outside a run, ``<DIR>-push`` beside it) and is exactly what a push sends; ``--dry-run``
stops there and lists it. Options default to the run recipe's ``push:`` section.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

log = logging.getLogger(__name__)


def _run_of(path: Path) -> Path | None:
    """The run directory DIR belongs to (DIR itself, or the parent of its ``final/``), if any."""
    if (path / "report.json").is_file() or ((path / "final").is_dir() and (path / "recipe.resolved.yaml").is_file()):
        return path
    if path.name == "final" and (path.parent / "report.json").is_file():
        return path.parent
    return None


def _recipe_push(run: Path | None) -> dict:
    import yaml

    if run is None or not (run / "recipe.resolved.yaml").is_file():
        return {}
    try:
        data = yaml.safe_load((run / "recipe.resolved.yaml").read_text()) or {}
    except yaml.YAMLError:
        return {}
    return data.get("push") or {}


def _identity(folder: Path, run: Path | None) -> tuple[str, str]:
    """(recipe name, recipe hash) for the commit message."""
    import hashlib

    import yaml

    if run is not None and (run / "report.json").is_file():
        rep = json.loads((run / "report.json").read_text())
        if rep.get("recipe") and rep.get("recipe_hash"):
            return rep["recipe"], rep["recipe_hash"]
    recipe_file = (run or folder) / "recipe.resolved.yaml"
    if recipe_file.is_file():
        data = yaml.safe_load(recipe_file.read_text()) or {}
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return str(data.get("name", folder.name)), hashlib.sha256(text.encode()).hexdigest()
    from compressor.fileio import hash_files, tree_hash

    return folder.name, tree_hash(hash_files(folder))


def plain_upload_folder(src: Path, out: Path, *, repo_id: str, what: str, license, datasets) -> Path:
    """The upload folder of a model or adapter folder that is not part of a run (card without metrics)."""
    from compressor.fileio import atomic_write_text, link_tree, make_tmp_dir, publish_dir
    from exporters.hub import upload_file_list
    from exporters.model_card import build_model_card

    tmp = make_tmp_dir(out.parent, out.name)
    try:
        link_tree(src, tmp, skip=("README.md",))
        recipe_yaml = (src / "recipe.resolved.yaml").read_text() if (src / "recipe.resolved.yaml").is_file() else None
        config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
        files = sorted(set(upload_file_list(tmp)) | {"README.md"})
        card = build_model_card(
            {}, repo_id=repo_id, what=what, recipe_yaml=recipe_yaml, base_model=None,
            base_model_desc=f"the local folder `{src.name}`", license=license, datasets=list(datasets), config=config,
            files=files, onnx_files=[f for f in files if f.endswith(".onnx")],
        )
        atomic_write_text(tmp / "README.md", str(card))
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, out)


@click.command("push")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo-id", help="Target repository `user/name` (default: the run recipe's push.repo_id).")
@click.option("--dry-run", is_flag=True, help="Write and list the upload folder; upload nothing.")
@click.option("--what", type=click.Choice(["model", "adapter"]), help="Push the final model or the last LoRA adapter.")
@click.option("--revision", help="Branch to commit to (created if missing; default main).")
@click.option("--private/--public", "private", default=None, help="Visibility of a new repository (default private).")
@click.option("--license", "license_", metavar="ID", help="Model-card licence (apache-2.0, mit, …).")
@click.option("--dataset", "datasets", multiple=True, metavar="ID", help="Model-card dataset (Hub id); repeatable.")
@click.option("--commit-message", help="Default: vlm-compress: <recipe> (recipe <hash>).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Upload folder (default <run>/push).")
@click.pass_obj
def push(obj, directory: Path, repo_id, dry_run, what, revision, private, license_, datasets, commit_message, out):
    """Upload a run's model or adapter to the Hugging Face Hub in one commit, with its model card.

    The token comes from HF_TOKEN or `hf auth login`, and is never printed or written. Exit 1
    when the run's gate failed (no push), 2 for a missing or refused token or a bad repository
    id, 3 when the Hub cannot be reached; the upload folder is kept in every case.
    """
    from compressor.errors import GateFailed, UserInputError
    from compressor.fileio import atomic_write_json
    from compressor.pipeline.publish import build_upload_folder, push_folder_summary
    from compressor.recipe.schema import PushSpec
    from exporters.hub import check_repo_id, push_folder, resolve_token

    directory = directory.resolve()
    run = _run_of(directory)
    if run is None and not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise UserInputError(f"{directory}: not a run directory, nor a model or adapter folder (no config.json)")
    defaults = _recipe_push(run)
    repo_id = repo_id or defaults.get("repo_id")
    if not repo_id:
        raise UserInputError("--repo-id is required (the run's recipe has no push.repo_id)")
    check_repo_id(repo_id)
    if what is None:
        what = defaults.get("what") or ("adapter" if run is None and (directory / "adapter_config.json").is_file() else "model")
    spec = PushSpec(
        repo_id=repo_id,
        private=defaults.get("private", True) if private is None else private,
        what=what,
        revision=revision or defaults.get("revision"),
        commit_message=commit_message or defaults.get("commit_message"),
        dry_run=dry_run,
        license=license_ or defaults.get("license"),
        datasets=list(datasets) or list(defaults.get("datasets") or []),
    )
    if run is not None and (run / "report.json").is_file():
        gate = json.loads((run / "report.json").read_text()).get("gate") or {}
        if gate and not gate.get("passed", False):
            if not dry_run:
                raise GateFailed(f"{run}: the run's gate failed ({gate.get('summary', '')}); not pushing")
            log.warning("the run's gate failed: a real push would be refused")
    if not dry_run:
        resolve_token()  # fail before writing anything when there is no token
    if run is not None:
        folder = build_upload_folder(run, repo_id=spec.repo_id, what=spec.what, license=spec.license,
                                     datasets=spec.datasets, out=out)
    else:
        folder = plain_upload_folder(directory, out or directory.parent / f"{directory.name}-push", repo_id=spec.repo_id,
                                     what=spec.what, license=spec.license, datasets=spec.datasets)
    if dry_run:
        result = push_folder_summary(folder, spec.repo_id, True)
        result.update(private=spec.private, revision=spec.revision or "main", what=spec.what)
    else:
        name, rhash = _identity(directory, run)
        result = push_folder(folder, spec, recipe_name=name, recipe_hash=rhash)
        if run is not None:
            atomic_write_json(run / "push.json", result)
    if obj is not None and obj.json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    vis = "private" if spec.private else "public"
    if dry_run:
        click.echo(f"dry run: {len(result['files'])} files in {folder} would be uploaded to {spec.repo_id} "
                   f"({vis}, revision {spec.revision or 'main'}):")
    else:
        vis = "private" if result["private"] else "public"
        click.echo(f"pushed {len(result['files'])} files to {result['url']} ({vis}, revision {result['revision']}) "
                   f"in one commit {result['commit_oid']}:")
    for rel in result["files"]:
        click.echo(f"  {rel}  ({(folder / rel).stat().st_size:,} bytes)")
