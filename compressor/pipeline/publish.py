"""The recipe's ``push:``: the folder that goes to the Hub, written locally; uploaded unless a dry run."""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.pipeline.io import link_tree, make_tmp_dir, publish_dir

log = logging.getLogger(__name__)


def upload_folder_for(recipe, run_dir: Path) -> Path:
    """``runs/<name>/push/``: exactly what would be uploaded (final model, or the last adapter)."""
    run_dir = Path(run_dir)
    if recipe.push.what == "adapter":
        adapters = sorted((run_dir / "stages").glob("*/model/adapter"))
        if not adapters:
            from compressor.errors import UserInputError

            raise UserInputError("push.what: adapter, but no stage of this run wrote a LoRA adapter")
        src = adapters[-1]
    else:
        src = run_dir / "final"
    tmp = make_tmp_dir(run_dir, "push")
    link_tree(src, tmp)
    if recipe.push.what == "adapter":
        (tmp / "recipe.resolved.yaml").write_text((run_dir / "recipe.resolved.yaml").read_text())
    return publish_dir(tmp, run_dir / "push")


def push_run(recipe, run_dir: Path, report: dict, loaded) -> dict:
    """Write the upload folder; upload it unless ``push.dry_run``. Returns a summary for the report."""
    folder = upload_folder_for(recipe, run_dir)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if recipe.push.dry_run:
        log.info("push dry run: %d files in %s would go to %s", len(files), folder, recipe.push.repo_id)
        return {
            "dry_run": True,
            "repo_id": recipe.push.repo_id,
            "folder": str(folder),
            "files": files,
            "summary": f"dry run: {len(files)} files in `{folder}` would be uploaded to `{recipe.push.repo_id}`",
        }
    from exporters.hub import push_folder

    return push_folder(folder, recipe.push, recipe_name=recipe.name, recipe_hash=loaded.hash())
