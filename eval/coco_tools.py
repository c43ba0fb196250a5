"""The COCO caption evaluation's Java tools, run the way pycocoevalcap runs them: Java itself, the
Stanford PTB tokenizer that every caption goes through, and SPICE.

Same jars, command lines and punctuation list as pycocoevalcap 1.2; the differences (and why)
are listed in :mod:`eval.captioning`: temporary files go to folders of ours and the jars are
given by absolute paths (pycocoevalcap writes into its package folder), every line-ending
character becomes a space (pycocoevalcap only replaces ``\\n``), and SPICE never downloads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from compressor.errors import StageError, UserInputError

logger = logging.getLogger(__name__)

#: pycocoevalcap/tokenizer/ptbtokenizer.py, unchanged.
PTB_JAR = "stanford-corenlp-3.4.1.jar"
PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
PTB_PUNCTUATIONS = (
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
)
SPICE_JAR = "spice-1.0.jar"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

# Everything str.splitlines() splits on except "\n" itself, which is handled too.
_LINE_BREAKS = dict.fromkeys(map(ord, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"), " ")
_JAVA_HINT = (
    "pycocoevalcap's PTB tokenizer and METEOR (and SPICE) run on Java. Install a Java runtime "
    "(8 or newer), e.g. `apt install default-jre-headless` (Debian/Ubuntu) or `conda install "
    "openjdk`, and make sure `java` is on PATH."
)


def check_java() -> str:
    """Find the ``java`` executable the caption metrics need.

    Returns:
        The absolute path of ``java`` found on ``PATH``.

    Raises:
        UserInputError: ``java`` is not on ``PATH``; the message says how to install it.
    """
    java = shutil.which("java")
    if java is None:
        raise UserInputError(f"`java` was not found on PATH. {_JAVA_HINT}")
    return java


def find_pycocoevalcap_dir() -> Path:
    """Locate the installed ``pycocoevalcap`` package folder (it holds the Java jars).

    ``pycocoevalcap`` 1.2 is a namespace package (no ``__init__.py``), so the folder is taken
    from ``submodule_search_locations``; the first one holding the PTB tokenizer jar wins.

    Returns:
        The package folder.

    Raises:
        UserInputError: pycocoevalcap is not installed, or no copy holds its tokenizer jar.
    """
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None:
        raise UserInputError(
            "pycocoevalcap is not installed: `pip install pycocoevalcap` (a dependency of vlm-compress)."
        )
    for loc in spec.submodule_search_locations or ():
        if (Path(loc) / "tokenizer" / PTB_JAR).is_file():
            return Path(loc)
    raise UserInputError(
        f"pycocoevalcap is installed but tokenizer/{PTB_JAR} is missing from "
        f"{list(spec.submodule_search_locations or [])}; reinstall it (`pip install --force-reinstall pycocoevalcap`)."
    )


def one_line(text: str) -> str:
    """Turn every line break (as ``str.splitlines`` sees them) into a space.

    Args:
        text: one caption.

    Returns:
        The caption on one line.
    """
    return text.translate(_LINE_BREAKS)


def meteor_safe(text: str) -> str:
    """Make a tokenized caption safe for METEOR's ``|||``-separated stdio protocol.

    Args:
        text: one caption.

    Returns:
        The caption on one line, without ``|||``, with single spaces.
    """
    return " ".join(one_line(text).replace("|||", " ").split())


def ptb_tokenize(
    captions: Sequence[str], *, coco_dir: str | Path | None = None, java: str | None = None
) -> list[str]:
    """PTB-tokenize captions exactly as pycocoevalcap's ``PTBTokenizer``, in one JVM call.

    Same jar (``stanford-corenlp-3.4.1.jar``), same command line (``-preserveLines
    -lowerCase``), same punctuation tokens removed. Differences: the input file is written to
    a fresh temporary folder (never into the package), the jar path is absolute, every line
    break becomes a space (not only ``\\n``), and blank captions are not sent (they come back
    as ``""``, as the tokenizer would return them).

    Args:
        captions: N captions.
        coco_dir: the pycocoevalcap package folder (default: :func:`find_pycocoevalcap_dir`).
        java: the ``java`` executable (default: :func:`check_java`).

    Returns:
        N tokenized captions: lowercase, tokens separated by single spaces.

    Raises:
        UserInputError: Java or the jar is missing.
        StageError: the tokenizer failed or returned a different number of lines.
    """
    lines = [one_line(c) for c in captions]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    if not todo:
        return out
    jar = Path(coco_dir or find_pycocoevalcap_dir()).resolve() / "tokenizer" / PTB_JAR
    if not jar.is_file():
        raise UserInputError(f"the PTB tokenizer jar is missing: {jar}")
    java = java or check_java()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlm-compress-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        # Lone surrogates (possible in JSON) cannot be encoded: they become '?'.
        src.write_bytes("\n".join(lines[i] for i in todo).encode("utf-8", errors="replace"))
        cmd = [java, "-cp", str(jar), PTB_CLASS, "-preserveLines", "-lowerCase", str(src)]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, check=False)
    err = proc.stderr.decode("utf-8", errors="replace").strip()
    if proc.returncode != 0:
        raise StageError(f"the PTB tokenizer failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    if err:
        logger.debug("PTB tokenizer: %s", err)
    got = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(got) < len(todo) or any(line.strip() for line in got[len(todo) :]):
        raise StageError(f"the PTB tokenizer returned {len(got)} lines for {len(todo)} captions")
    for i, line in zip(todo, got[: len(todo)], strict=True):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)
    logger.info("PTB tokenization of %d captions: %.2f s", len(todo), time.perf_counter() - t0)
    return out


def spice_status(coco_dir: str | Path | None = None) -> tuple[bool, str]:
    """Whether SPICE can run: its jar and the Stanford CoreNLP 3.6.0 jars are present.

    Args:
        coco_dir: the pycocoevalcap package folder (default: :func:`find_pycocoevalcap_dir`).

    Returns:
        ``(True, "")`` or ``(False, reason)``, the reason saying which files to put where.
    """
    spice_dir = Path(coco_dir or find_pycocoevalcap_dir()) / "spice"
    missing = [spice_dir / SPICE_JAR] if not (spice_dir / SPICE_JAR).is_file() else []
    missing += [spice_dir / "lib" / j for j in SPICE_CORENLP_JARS if not (spice_dir / "lib" / j).is_file()]
    if not missing:
        return True, ""
    return False, (
        "SPICE needs " + ", ".join(str(m) for m in missing) + " (Stanford CoreNLP 3.6.0 from "
        "stanford-corenlp-full-2015-12-09.zip at nlp.stanford.edu; this tool downloads nothing)"
    )


def run_spice(
    references: Mapping[str, Sequence[str]],
    hypotheses: Mapping[str, str],
    *,
    coco_dir: str | Path | None = None,
    java: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """SPICE F-scores through pycocoevalcap's ``spice-1.0.jar``, with our own temporary files.

    The command is pycocoevalcap's (``java -jar -Xmx8G spice-1.0.jar IN -out OUT -subset
    -silent``), but the input and output files live in a temporary folder, and the LMDB cache
    (``-cache``) is used only when ``cache_dir`` is given: pycocoevalcap keeps both inside its
    package folder, and the cache is known to fail on Java 9+.

    Args:
        references: ``{id: [tokenized references]}``.
        hypotheses: ``{id: tokenized hypothesis}`` (same ids).
        coco_dir: the pycocoevalcap package folder (default: :func:`find_pycocoevalcap_dir`).
        java: the ``java`` executable (default: :func:`check_java`).
        cache_dir: SPICE's parse cache, or None for no cache.

    Returns:
        ``{id: SPICE F-score in [0, 100]}`` (NaN where SPICE gives none).

    Raises:
        StageError: the SPICE process failed or its output lacks an id.
    """
    spice_dir = Path(coco_dir or find_pycocoevalcap_dir()).resolve() / "spice"
    java = java or check_java()
    rows = [{"image_id": i, "test": hypotheses[i], "refs": list(references[i])} for i in hypotheses]
    with tempfile.TemporaryDirectory(prefix="vlm-compress-spice-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        cmd = [
            java,
            "-jar",
            "-Xmx8G",
            str(spice_dir / SPICE_JAR),
            str(src),
            "-out",
            str(dst),
            "-subset",
            "-silent",
        ]
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            cmd[5:5] = ["-cache", str(cache_dir)]
        proc = subprocess.run(cmd, cwd=spice_dir, capture_output=True, check=False)
        if proc.returncode != 0 or not dst.is_file():
            err = (proc.stderr + proc.stdout).decode("utf-8", errors="replace").strip()
            raise StageError(f"SPICE failed (exit {proc.returncode}): {err[-1500:]}")
        results = json.loads(dst.read_text(encoding="utf-8"))
    scores: dict[str, float] = {}
    for item in results:
        try:
            f = float(item["scores"]["All"]["f"])
        except (TypeError, ValueError, KeyError):
            f = math.nan
        scores[str(item["image_id"])] = 100.0 * f
    lost = [i for i in hypotheses if i not in scores]
    if lost:
        raise StageError(f"SPICE returned no score for {len(lost)} ids, e.g. {lost[:5]}")
    return scores
