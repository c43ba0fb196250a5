"""Student size against CIDEr: ``recipes/distill_blip2_to_smolvlm.yaml`` with SmolVLM students of several widths.

The recipe's gate asks the distilled SmolVLM for 90% of the BLIP-2 teacher's CIDEr on the
held-out shapes. This runs the recipe once per student width (SigLIP and Llama of that width, the
layer counts of ``small-smolvlm``) into ONE run directory, so the teacher's evaluation and its
captions of the training images are computed once and reused (the distill stage's cache), and
prints per width: parameters, the ratio to the teacher's, the student's CIDEr and its share of
the teacher's (where the curve crosses 90% is where the recipe's gate starts to pass).

Usage::

    python -m bench.distill_curve [--widths 32,48,64,96] [--out runs/distill_curve] [--set KEY=VALUE …] [--resume]

``--set`` is passed to every ``compress apply`` (e.g. ``--set stages.1.train.steps=300`` for a quick
curve). Each width runs the whole recipe (distil, export, ONNX Runtime evaluation): at the recipe's
own budget (4,000 images, 1,200 steps) about 5 minutes per width on 2 cores, plus the teacher's
captions once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "distill_blip2_to_smolvlm.yaml"


def student_folder(width: int, root: Path) -> Path:
    """A SmolVLM of ``width`` (vision and language model; small-smolvlm's layer counts), saved once."""
    from compressor.models.presets import _smolvlm

    out = root / f"student-w{width}"
    if not (out / "config.json").is_file():
        heads = 4 if width % 4 == 0 else 2
        model, proc = _smolvlm(0, vh=width, vl=2, th=width, tl=4, ffn=2 * width, heads=heads, kv_heads=heads // 2)
        model.save_pretrained(out)
        proc.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.distill_curve", description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="32,48,64,96")
    ap.add_argument("--out", type=Path, default=Path("runs/distill_curve"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--resume", action="store_true", help="continue an interrupted curve (compress apply --resume)")
    args = ap.parse_args(argv)
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        folder = student_folder(width, args.out / "students")
        cmd = [sys.executable, "-m", "compressor.cli", "apply", str(RECIPE), "--out", str(args.out / "run"),
               "--set", f"stages.1.student={folder.resolve()}"]
        for o in args.overrides:
            cmd += ["--set", o]
        if args.resume:
            cmd.append("--resume")
        rc = subprocess.run(cmd, cwd=REPO).returncode
        if rc not in (0, 1):  # 1: the gate failed, which is a point of the curve
            print(f"width {width}: compress apply exited {rc}", file=sys.stderr)
            return rc
        report = json.loads((args.out / "run" / "report.json").read_text())
        ev = report["evaluations"]
        t, s = ev["teacher"], ev["student_eval"]
        rows.append((width, s["characteristics"]["params_total"], t["characteristics"]["params_total"],
                     t["metrics"]["cider"], s["metrics"]["cider"]))
    print(f"{'width':>6}{'params':>12}{'ratio':>8}{'teacher CIDEr':>15}{'student CIDEr':>15}{'share':>8}")
    for width, sp, tp, tc, sc in rows:
        print(f"{width:>6}{sp:>12,}{sp / tp:>8.3f}{tc:>15.2f}{sc:>15.2f}{100 * sc / tc:>7.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
