"""Publishing and reporting end to end: `compress push` through the REAL huggingface_hub client
against a loopback Hub (tests/fake_hub.py) that records every request, the push dry run, the
recipe's push inside `compress apply`, failures (token, network, namespace, gate), and
`compress report` over two runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fake_hub import FakeHub

TOKEN = "hf_LoopbackSecret0123456789abcdefXYZ"

RECIPE = """\
name: {name}
model: tiny-blip2-opt
seed: 0
data:
  format: synthetic
  train: {{size: 16}}
  eval: {{size: 8}}
generation: {{max_new_tokens: 8, batch_size: 8}}
stages:
  - type: lora_finetune
    parts: [qformer.self_attention, language_model.attention]
    lora: {{r: 4, lora_alpha: 8}}
    train: {{steps: 2, batch_size: 8, learning_rate: 1.0e-3}}
  - type: merge_adapters
  - type: evaluate
    label: baseline
    metrics: [bleu_4, cider]
    characteristics: {{latency: {{batch_sizes: [1], repeats: 1}}}}
  - type: remove_layers
    qformer: {{drop_top: 2}}
    language_model: {{drop_top: {lm_drop}}}
  - type: heal
    parts: [language_model.attention]
    train: {{steps: 2, batch_size: 8, learning_rate: 1.0e-3}}
  - type: merge_adapters
  - type: export
  - type: evaluate
    label: candidate
    metrics: [bleu_4, cider]
    characteristics: {{latency: {{batch_sizes: [1], repeats: 1}}}}
gate:
  candidate: candidate
  baseline: baseline
  rules: {{params_total: {{max_ratio: 0.95}}}}
push: {{repo_id: me/tiny-compressed, dry_run: true, license: apache-2.0}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of the tiny preset (different removals), with their recipes."""
    tmp = tmp_path_factory.mktemp("publish")
    out = {}
    for name, lm_drop in (("llm4", 2), ("llm2", 4)):
        recipe = tmp / f"{name}.yaml"
        recipe.write_text(RECIPE.format(name=name, lm_drop=lm_drop))
        res = run_cli("apply", str(recipe), "--out", str(tmp / name))
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = (tmp / name, recipe)
    return out


def hub_env(tmp_path: Path, url: str, token: str | None = TOKEN) -> dict:
    """Environment of a push subprocess: the loopback endpoint, a private HF_HOME, legacy LFS (no Xet)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def push_cli(*args, env: dict):
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)})


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_no_token_anywhere(token: str, *roots: Path, texts: tuple[str, ...] = ()) -> None:
    needle = token.encode()
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"token written to {p}"
    for t in texts:
        assert token not in t


# ------------------------------------------------------------------------------------ dry run


def test_apply_dry_run_writes_the_upload_folder_with_a_card(runs):
    from exporters.model_card import card_metrics

    run, _ = runs["llm4"]
    folder = run / "push"
    files = set(tree_bytes(folder))
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "recipe.resolved.yaml",
            "plots/metrics.png", "plots/characteristics.png"} <= files
    report = json.loads((run / "report.json").read_text())
    assert report["push"]["dry_run"] is True and set(report["push"]["files"]) == files
    metrics = card_metrics(folder / "README.md")
    for label in ("baseline", "candidate"):
        want = {k: round(v, 4) for k, v in report["evaluations"][label]["metrics"].items()}
        assert metrics[label] == want
    card = (folder / "README.md").read_text()
    assert "removed layers [2, 3] of 4" in card and "`params_total` must be at most 0.95× the baseline" in card
    # the model folder in push/ is hard-linked, not copied
    assert os.stat(folder / "model.safetensors").st_ino == os.stat(run / "final" / "model.safetensors").st_ino


def test_push_dry_run_lists_the_folder_it_writes(runs, tmp_path):
    run, _ = runs["llm4"]
    out = tmp_path / "upload"
    res = run_cli("push", str(run), "--repo-id", "me/other-name", "--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    listed = [ln.split("  (")[0].strip() for ln in res.stdout.splitlines()[1:]]
    assert listed == sorted(tree_bytes(out)) and "README.md" in listed
    assert "would be uploaded to me/other-name (private, revision main)" in res.stdout
    assert "# other-name" in (out / "README.md").read_text()


def test_push_dry_run_of_a_folder_outside_a_run(runs, tmp_path):
    from exporters.model_card import card_metrics

    run, _ = runs["llm4"]
    model = tmp_path / "exported"
    shutil.copytree(run / "final", model)
    res = run_cli("push", str(model), "--repo-id", "me/exported", "--dry-run", "--license", "mit")
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "exported-push"
    assert set(tree_bytes(folder)) == set(tree_bytes(model)) | {"README.md"}
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and "No evaluation was recorded" in card and card_metrics(folder / "README.md") == {}
    assert tree_bytes(model) == tree_bytes(run / "final")  # the source folder is untouched


# ------------------------------------------------------------------------------------ loopback push


def test_push_sends_one_commit_with_exactly_the_dry_run_files_and_no_token_leaks(runs, tmp_path):
    from huggingface_hub import ModelCard

    from exporters.model_card import card_metrics

    run, _ = runs["llm4"]
    dry = run_cli("--json", "push", str(run), "--repo-id", "me/tiny-compressed", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    dry_files = json.loads(dry.stdout)["files"]
    report = json.loads((run / "report.json").read_text())
    with FakeHub(TOKEN) as hub:
        res = push_cli("--debug", "push", str(run), "--repo-id", "me/tiny-compressed", env=hub_env(tmp_path, hub.url))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not hub.unhandled, [(r["method"], r["path"]) for r in hub.unhandled]
    assert hub.repos["me/tiny-compressed"]["private"] is True
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit.revision == "main"
    assert commit.summary == f"vlm-compress: llm4 (recipe {report['recipe_hash'][:12]})"
    arrived = hub.committed_bytes(commit)
    assert sorted(arrived) == dry_files
    assert arrived == tree_bytes(run / "push")  # byte for byte what the folder holds
    assert "model.safetensors" in commit.lfs_files and "README.md" in commit.files  # LFS and regular paths
    # the card that arrived parses back into the run's metrics
    card_path = tmp_path / "arrived.md"
    card_path.write_bytes(arrived["README.md"])
    ModelCard.load(card_path, ignore_metadata_errors=False)
    assert card_metrics(card_path)["candidate"]["cider"] == round(report["evaluations"]["candidate"]["metrics"]["cider"], 4)
    # every Hub API call carried the token; the LFS storage upload and the agent registry did not
    unauthenticated = {(r["method"], r["path"]) for r in hub.requests if r["headers"].get("authorization") != f"Bearer {TOKEN}"}
    assert all((m == "PUT" and p.startswith("/_lfs/")) or p == "/api/agent-harnesses" for m, p in unauthenticated)
    paths = [r["path"] for r in hub.requests]
    assert paths.count("/api/repos/create") == 1 and sum("/commit/" in p for p in paths) == 1
    assert "/api/validate-yaml" in paths  # huggingface_hub had the Hub check the card's metadata
    assert "pushed 10 files" in res.stdout and "in one commit" in res.stdout
    summary = json.loads((run / "push.json").read_text())
    assert summary["commit_oid"] and summary["files"] == dry_files
    assert_no_token_anywhere(TOKEN, run, tmp_path, texts=(res.stdout, res.stderr))


def test_recipe_push_inside_apply_goes_to_the_hub_on_a_branch(runs, tmp_path):
    """`compress apply` with push.dry_run false: every stage is reused, then one commit on `dev`."""
    run, recipe = runs["llm2"]
    with FakeHub(TOKEN) as hub:
        res = push_cli("apply", str(recipe), "--out", str(run), "--set", "push.dry_run=false",
                       "--set", "push.revision=dev", "--set", "push.private=false", env=hub_env(tmp_path, hub.url))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s["status"] for s in json.loads((run / "manifest.json").read_text())["stages"]] == ["reused"] * 8
    assert hub.repos["me/tiny-compressed"]["private"] is False and "dev" in hub.repos["me/tiny-compressed"]["branches"]
    assert len(hub.commits) == 1 and hub.commits[0].revision == "dev"
    assert sorted(hub.committed_bytes(hub.commits[0])) == sorted(tree_bytes(run / "push"))
    push = json.loads((run / "report.json").read_text())["push"]
    assert push["dry_run"] is False and push["revision"] == "dev" and push["commit_oid"]
    assert_no_token_anywhere(TOKEN, run, tmp_path, texts=(res.stdout, res.stderr))


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("I ", "W "))]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_private_push_into_an_existing_public_repo_is_refused(runs, tmp_path):
    run, _ = runs["llm4"]
    with FakeHub(TOKEN) as hub:
        env = hub_env(tmp_path, hub.url)
        first = push_cli("push", str(run), "--repo-id", "me/open", "--public", env=env)
        assert first.returncode == 0, first.stderr[-2000:]
        second = push_cli("push", str(run), "--repo-id", "me/open", env=env)  # private by default
    assert second.returncode == 2
    assert "already exists and is public" in _one_error_line(second.stderr)
    assert len(hub.commits) == 1 and hub.repos["me/open"]["private"] is False


def test_adapter_push_dry_run(runs, tmp_path):
    run, _ = runs["llm4"]
    out = tmp_path / "adapter"
    res = run_cli("push", str(run), "--repo-id", "me/tiny-lora", "--what", "adapter", "--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    files = set(tree_bytes(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.resolved.yaml"} <= files
    assert "model.safetensors" not in files and not any(f.startswith("onnx/") for f in files)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert "trained on the model after stage 3 (`remove_layers`)" in card  # the heal adapter needs the pruned model


def test_refused_token_exits_2_with_one_line_and_keeps_everything(runs, tmp_path):
    run, _ = runs["llm4"]
    assert run_cli("push", str(run), "--repo-id", "me/tiny-compressed", "--dry-run").returncode == 0
    before = tree_bytes(run / "push")
    wrong = "hf_WrongToken9876543210zyxwvutsrq"
    with FakeHub(TOKEN) as hub:
        res = push_cli("push", str(run), "--repo-id", "me/tiny-compressed", env=hub_env(tmp_path, hub.url, token=wrong))
    assert res.returncode == 2, res.stderr
    line = _one_error_line(res.stderr)
    assert "refused the token (HTTP 401)" in line and "HF_TOKEN" in line and "is kept" in line
    assert not hub.commits
    assert tree_bytes(run / "push") == before
    assert_no_token_anywhere(wrong, run, tmp_path, texts=(res.stdout, res.stderr))


def test_namespace_without_write_access_exits_2(runs, tmp_path):
    run, _ = runs["llm4"]
    with FakeHub(TOKEN) as hub:
        res = push_cli("push", str(run), "--repo-id", "someone-else/tiny", env=hub_env(tmp_path, hub.url))
    assert res.returncode == 2, res.stderr
    assert "HTTP 403" in _one_error_line(res.stderr) and not hub.commits


def test_missing_token_exits_2_before_writing(runs, tmp_path):
    run, _ = runs["llm4"]
    out = tmp_path / "upload"
    res = push_cli("push", str(run), "--repo-id", "me/x", "--out", str(out), env=hub_env(tmp_path, "http://127.0.0.1:9", None))
    assert res.returncode == 2
    assert "no Hugging Face token" in _one_error_line(res.stderr)
    assert not out.exists()


def test_unreachable_hub_exits_3_with_one_line(runs, tmp_path):
    run, _ = runs["llm4"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = push_cli("push", str(run), "--repo-id", "me/x", env=hub_env(tmp_path, f"http://127.0.0.1:{port}"))
    assert res.returncode == 3, res.stderr
    line = _one_error_line(res.stderr)
    assert "cannot reach the Hub" in line and "is kept" in line
    assert (run / "push" / "model.safetensors").is_file()


def test_bad_repo_id_or_folder_exits_2(runs, tmp_path):
    run, _ = runs["llm4"]
    res = run_cli("push", str(run), "--repo-id", "no-namespace", "--dry-run", "--out", str(tmp_path / "up"))
    assert res.returncode == 2 and "expected `user/name`" in res.stderr and not (tmp_path / "up").exists()
    res = run_cli("push", str(tmp_path), "--repo-id", "me/x", "--dry-run")
    assert res.returncode == 2 and "not a run directory, nor a model or adapter folder" in res.stderr


def test_failed_gate_is_never_pushed(runs, tmp_path):
    run, _ = runs["llm4"]
    copy = tmp_path / "failed"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("stages", "inputs"))
    report = json.loads((copy / "report.json").read_text())
    report["gate"]["passed"] = False
    report["gate"]["summary"] = "cider max_drop (drop 9 > 2)"
    (copy / "report.json").write_text(json.dumps(report))
    with FakeHub(TOKEN) as hub:
        res = push_cli("push", str(copy), "--repo-id", "me/tiny", env=hub_env(tmp_path, hub.url))
    assert res.returncode == 1 and "gate failed" in res.stderr
    assert not hub.requests


# ------------------------------------------------------------------------------------ compress report


def test_report_over_two_runs_writes_plots_and_a_combined_table(runs, tmp_path):
    from PIL import Image

    out = tmp_path / "cmp"
    res = run_cli("report", str(runs["llm4"][0]), str(runs["llm2"][0]), "--out", str(out), "--against", "params")
    assert res.returncode == 0, res.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names == {"comparison.md", "comparison.csv", "metrics.png", "params.png", "latency.png", "gflops.png",
                     "pareto_cider_params.png"}
    for png in out.glob("*.png"):
        assert Image.open(png).format == "PNG"
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["experiment"] for r in rows] == ["baseline", "llm4", "llm2"]  # the shared baseline once
    params = [int(r["params_total"]) for r in rows]
    assert params[0] > params[1] > params[2]
    md = (out / "comparison.md").read_text()
    assert "| baseline |" in md and "| llm2 |" in md and "![pareto_cider_params](pareto_cider_params.png)" in md


def test_report_of_a_folder_without_report_exits_2_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "cmp"
    res = run_cli("report", str(runs["llm4"][0]), str(tmp_path), "--out", str(out))
    assert res.returncode == 2 and "no readable report.json" in res.stderr
    assert not out.exists()
    res = run_cli("report", str(runs["llm4"][0]), "--out", str(out), "--metric", "cidr")
    assert res.returncode == 2 and "Did you mean 'cider'" in res.stderr and not out.exists()
