"""The ``hf`` format: a Hugging Face ``datasets`` dataset (what the published studies loaded theirs with).

``path`` is one of:

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``, memory-mapped);
* a Parquet, Arrow or JSON-lines file, or a glob of them (``data/train-*.parquet``), or a folder of
  such files laid out as on the Hub (read with ``datasets.load_dataset``);
* a Hub dataset id (``jxie/coco_captions``) when online, with ``revision`` to pin it and
  ``streaming: true`` to read rows as they arrive instead of downloading the whole set.

``split`` names the dataset's own split (default: its only split; a dataset with several splits
needs one). ``data.source`` with ``data.split`` fractions divides one split as for every format.

Columns (``data.columns``, once for every section): ``image`` (default ``image``) is a
``datasets.Image`` column (its bytes, else its path), a column of image bytes, or of file paths
(relative paths resolve against the dataset's folder); ``caption`` (default the first of
``captions``, ``caption``, ``text``) holds a string or a list of strings per row, and rows sharing
an image ``id`` add their captions up (COCO as one row per caption); VQA reads ``question`` and
``answer`` (default ``answers`` or ``answer``: a string, a list of strings, or VQA's
``{"answer": …}`` objects) and ``question_id`` when present. ``id`` (default: the image file's
name without extension, else the row number) names images. A column the recipe names that the
dataset lacks exits 2 naming the columns it has.

Images stored in the dataset are not decoded when the data loads: an example carries a reference
(:attr:`~compressor.data.dataset.Example.fetch`) from which :func:`image_bytes` reads the encoded
image, in this process or in a loader worker. Streamed rows keep their encoded image in memory.

Fingerprint: the data files' bytes (files over 256 MB: their name, size and modification time, as
image files are stamped), so a re-saved dataset with one caption edited reruns the stages that
read it; for a Hub dataset its id, revision and the fingerprint ``datasets`` gives the download.
Nothing of the dataset is written by this project; ``datasets`` keeps its own cache
(``HF_DATASETS_CACHE``) for files and Hub datasets it converts to Arrow.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
from collections.abc import Mapping
from typing import Any

from compressor.data.dataset import Example
from compressor.data.formats import Format
from compressor.data.formats.common import (
    DUPLICATE,
    EMPTY,
    MALFORMED,
    Parsed,
    Problem,
    Row,
    clean_text,
    short,
)
from compressor.errors import DataError, UserInputError, did_you_mean

logger = logging.getLogger(__name__)

EXAMPLE = "{path: data/coco_hf, split: train}"
#: File suffix → the ``datasets`` packaged builder that reads it.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
#: Data files larger than this enter the fingerprint by name, size and mtime instead of their bytes.
BIG_FILE = 256 * 1024**2
SAVED_MARKERS = ("dataset_dict.json", "state.json")
CAPTION_DEFAULTS = ("captions", "caption", "text")
ANSWER_DEFAULTS = ("answers", "answer")


def _cache_dir() -> str | None:
    return os.environ.get("HF_DATASETS_CACHE") or None


def _is_saved(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, m)) for m in SAVED_MARKERS)


def _locate(path: str, key: str, revision: str | None) -> tuple[tuple, str | None]:
    """``(locator, root)``: how to open ``path`` (hashable) and the folder relative image paths resolve in.

    Raises:
        DataError: a local path that does not exist and cannot be a Hub id.
        UserInputError: a file type ``datasets`` is not asked to read here.
    """
    ap = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(ap):
        return (("disk", ap) if _is_saved(ap) else ("folder", ap)), ap
    files = sorted(glob.glob(ap)) if any(c in path for c in "*?[") else ([ap] if os.path.isfile(ap) else [])
    if files:
        suffixes = {os.path.splitext(f)[1].lower() for f in files}
        builders = {BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise UserInputError(
                f"{key}.path: {path} holds {', '.join(sorted(suffixes))} files; format hf reads Parquet, Arrow or "
                "JSON-lines files (one kind per section), a save_to_disk folder, or a Hub dataset id"
            )
        return ("files", builders.pop(), ap if len(files) > 1 else files[0]), os.path.dirname(files[0])
    hub_like = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.splitext(path)[1]
    if hub_like:
        return ("hub", path, revision), None
    raise DataError(f"{key}.path: {path} not found (relative paths resolve against {os.getcwd()})")


def _signature(locator: tuple) -> tuple:
    """Names, sizes and mtimes of a local dataset's files: a changed file reopens the dataset."""
    kind = locator[0]
    if kind == "hub":
        return ()
    return tuple((f, *_stat(f)) for f in _local_files(locator))


def _stat(f: str) -> tuple[int, int]:
    st = os.stat(f)
    return st.st_size, st.st_mtime_ns


def _local_files(locator: tuple, split_dir: str | None = None) -> list[str]:
    """Every file of a local dataset (of one split folder of a save_to_disk DatasetDict when given)."""
    kind = locator[0]
    if kind == "files":
        return sorted(glob.glob(locator[2])) if any(c in locator[2] for c in "*?[") else [locator[2]]
    root = split_dir or locator[1]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    if split_dir is not None:  # the DatasetDict's own index of splits
        top = os.path.join(locator[1], "dataset_dict.json")
        out = ([top] if os.path.isfile(top) else []) + out
    return out


@functools.lru_cache(maxsize=8)
def _load(locator: tuple, streaming: bool, cache_dir: str | None, signature: tuple):
    """Open a dataset (``datasets``' own objects); cached per process while its files are unchanged."""
    import datasets

    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        kind = locator[0]
        if kind == "disk":
            return datasets.load_from_disk(locator[1])
        kw: dict[str, Any] = {"streaming": True} if streaming else {}
        if cache_dir:
            kw["cache_dir"] = cache_dir
        if kind == "files":
            return datasets.load_dataset(locator[1], data_files=locator[2], **kw)
        if kind == "folder":
            return datasets.load_dataset(locator[1], **kw)
        return datasets.load_dataset(locator[1], revision=locator[2], **kw)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _open(locator: tuple, streaming: bool, key: str, path: str):
    """:func:`_load` with its failures turned into messages that say what to do.

    Raises:
        DataError: the dataset cannot be read (not found offline, corrupt files).
    """
    try:
        return _load(locator, streaming, _cache_dir(), _signature(locator))
    except (UserInputError, KeyboardInterrupt):
        raise
    except Exception as e:  # datasets raises FileNotFoundError, ConnectionError, DatasetNotFoundError, ValueError …
        first = str(e).splitlines()[0][:300] if str(e) else ""
        if locator[0] == "hub":
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
                "HF_DATASETS_OFFLINE", ""
            ).lower() in ("1", "true", "yes")
            raise DataError(
                f"{key}.path: '{path}' is neither a local path (relative paths resolve against {os.getcwd()}) nor a "
                f"Hub dataset that could be loaded ({'offline mode is set' if offline else type(e).__name__}: {first}). "
                "Offline, point it at a save_to_disk folder or Parquet / JSON-lines files."
            ) from None
        raise DataError(f"{key}.path: datasets cannot read {path}: {type(e).__name__}: {first}") from None


def _is_dict(obj) -> bool:
    from datasets import DatasetDict, IterableDatasetDict

    return isinstance(obj, (DatasetDict, IterableDatasetDict))


def _pick_split(obj, want: str | None, key: str, path: str):
    """``(dataset, split name or None)`` of a loaded object.

    Raises:
        UserInputError: several splits and none chosen, or a split the dataset lacks (its splits named).
    """
    if _is_dict(obj):
        names = list(obj.keys())
        if want is None:
            if len(names) == 1:
                return obj[names[0]], names[0]
            raise UserInputError(
                f"{key}: {path} has splits {', '.join(names)}: choose one with `{key}.split: {names[0]}`"
            )
        if want not in names:
            raise UserInputError(
                f"{key}.split: {path} has no split '{want}'.{did_you_mean(want, names)} Its splits: {', '.join(names)}"
            )
        return obj[want], want
    if want is not None and str(getattr(obj, "split", None) or "") != want:
        raise UserInputError(f"{key}.split: {path} is one dataset without splits; remove `split: {want}`")
    return obj, want


def settings(resolved) -> dict:
    """What identifies a section besides its files: split, columns, streaming, revision."""
    src, spec = resolved.src, resolved.spec
    columns = getattr(spec, "columns", None)
    return {
        "hf_split": src.split,
        "columns": columns.model_dump() if columns is not None else None,
        "streaming": bool(src.streaming),
        "revision": src.revision,
    }


def _columns(wanted: Mapping[str, Any] | None, task: str, names: list[str], key: str) -> dict[str, str | None]:
    """role → column of the dataset (None: not there and not required).

    Raises:
        UserInputError: a column the recipe names (or the image / question column) is missing;
            the message names it and the columns the dataset has.
    """
    wanted = dict(wanted or {})

    def missing(role: str, col: str):
        return UserInputError(
            f"data.columns.{role}: the dataset of {key} has no column '{col}'.{did_you_mean(col, names)} "
            f"Its columns: {', '.join(names)}. Set `data.columns: {{{role}: <column>}}`"
        )

    out: dict[str, str | None] = {}
    required = ["image"] + (["question"] if task == "vqa" else [])
    defaults = {"image": ("image",), "question": ("question",), "caption": CAPTION_DEFAULTS,
                "answer": ANSWER_DEFAULTS, "question_id": ("question_id",), "id": ()}
    roles = ["image", "id"] + (["question", "answer", "question_id"] if task == "vqa" else ["caption"])
    for role in roles:
        col = wanted.get(role)
        if col is not None:
            if col not in names:
                raise missing(role, col)
            out[role] = col
            continue
        found = next((c for c in defaults[role] if c in names), None)
        if found is None and role in required:
            raise missing(role, defaults[role][0])
        out[role] = found
    return out


def _texts(value) -> tuple[str, ...] | None:
    """Captions or answers of a cell: a string, a list of strings or of ``{"answer": …}``; None when bad."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, dict):
            v = v.get("answer")
        t = clean_text(v)
        if t is None:
            return None
        out.append(t)
    return tuple(out)


def _image_refs(ds, column: str) -> list[tuple[bool, str | None]]:
    """Per row ``(has stored bytes, path or None)`` without reading the image bytes (Arrow buffers only)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.select_columns([column]).with_format("arrow")[:].column(column)
    typ = col.type
    if pa.types.is_struct(typ):
        names = [typ.field(i).name for i in range(typ.num_fields)]
        has = pc.invert(pc.is_null(pc.struct_field(col, "bytes"))).to_pylist() if "bytes" in names else [False] * len(col)
        paths = pc.struct_field(col, "path").to_pylist() if "path" in names else [None] * len(col)
        return list(zip(has, paths))
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return [(h, None) for h in pc.invert(pc.is_null(col)).to_pylist()]
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return [(False, p) for p in col.to_pylist()]
    raise UserInputError(
        f"data.columns.image: column '{column}' holds {typ}; expected a datasets.Image column, image bytes or file paths"
    )


def _stream_ref(value) -> tuple[bytes | None, str | None]:
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    raise UserInputError(f"data.columns.image: a streamed row holds {type(value).__name__}; expected an image, bytes or a path")


def _image_id(id_value, path: str | None, row: int) -> str:
    if id_value is not None:
        return str(id_value)
    if path:
        return os.path.splitext(os.path.basename(path))[0]
    return str(row)


def _resolve_path(root: str | None, p: str) -> str:
    p = os.path.expanduser(p)
    if os.path.isabs(p) or root is None:
        return os.path.normpath(p)
    return os.path.normpath(os.path.join(root, p))


class _Builder:
    """Turns rows into examples: captions of one image id add up; VQA rows are one question each."""

    def __init__(self, task: str, cols: dict[str, str | None], name: str):
        self.task, self.cols, self.name = task, cols, name
        self.out = Parsed()
        self.by_id: dict[str, int] = {}
        self.qids: set[str] = set()

    def add(self, i: int, row: Mapping[str, Any], image: tuple[str | None, tuple | None]) -> None:
        cols = self.cols
        path, fetch = image
        id_value = row.get(cols["id"]) if cols["id"] else None
        where = f"{self.name} row {i}"
        if cols["id"] and id_value is None:
            self.out.problems.append(Problem(MALFORMED, where, f"no {cols['id']}"))
            return
        if path is None and fetch is None:
            self.out.problems.append(Problem(MALFORMED, where, f"no image in column {cols['image']}"))
            return
        iid = _image_id(id_value, path, i)
        where = f"{where} (id={iid})"
        if self.task == "caption":
            caps: tuple[str, ...] = ()
            if cols["caption"]:
                value = row.get(cols["caption"])
                caps = _texts(value) if value is not None else None  # type: ignore[assignment]
                if not caps:
                    self.out.problems.append(Problem(EMPTY, where, f"{cols['caption']}={short(value)}"))
                    return
            if iid in self.by_id:
                k = self.by_id[iid]
                prev = self.out.rows[k]
                ex = prev.example
                self.out.rows[k] = Row(Example(ex.image_id, ex.captions + caps, image_path=ex.image_path, fetch=ex.fetch), prev.where)
                return
            self.by_id[iid] = len(self.out.rows)
            self.out.rows.append(Row(Example(iid, caps, image_path=path, fetch=fetch), where))
            return
        q = clean_text(row.get(cols["question"]))
        if q is None:
            self.out.problems.append(Problem(EMPTY, where, f"{cols['question']}={short(row.get(cols['question']))}"))
            return
        answers: tuple[str, ...] = ()
        if cols["answer"] and row.get(cols["answer"]) not in (None, [], ""):
            answers = _texts(row.get(cols["answer"]))  # type: ignore[assignment]
            if answers is None:
                self.out.problems.append(Problem(EMPTY, where, "an answer is empty or not a string"))
                return
        qv = row.get(cols["question_id"]) if cols["question_id"] else None
        qid = str(qv) if qv is not None else f"{iid}-{i}"
        if qid in self.qids:
            self.out.problems.append(Problem(DUPLICATE, where, f"question_id {qid} appears more than once"))
            return
        self.qids.add(qid)
        self.out.rows.append(
            Row(Example(iid, question=q, answers=answers, question_id=qid, image_path=path, fetch=fetch), where)
        )


def read(src, key: str, task: str, settings: Mapping[str, Any]) -> Parsed:
    """Read one section of a Hugging Face dataset (see the module docstring).

    Args:
        src: the DataSource (``path``, ``split``, ``streaming``, ``revision``, ``limit``).
        key: its recipe key (for messages).
        task: ``"caption"`` or ``"vqa"``.
        settings: :func:`settings` (the columns of ``data.columns``).

    Returns:
        Captioning: one row per image id; VQA: one row per question. With ``streaming``, at most
        ``limit`` of them, in stream order.

    Raises:
        UserInputError: ``path`` not given, a split or column the dataset lacks, an image column of
            another type.
        DataError: the dataset cannot be found or read.
    """
    if not src.path:
        raise UserInputError(f"{key}.path is required for format hf: set `{key}: {EXAMPLE}`")
    locator, root = _locate(src.path, key, src.revision)
    streaming = bool(src.streaming)
    obj = _open(locator, streaming, key, src.path)
    ds, split = _pick_split(obj, src.split, key, src.path)
    names = list(ds.column_names or (ds.features or {}).keys())
    cols = _columns(settings.get("columns"), task, names, key)
    label = os.path.basename(os.path.normpath(src.path)) + (f"[{split}]" if split else "")
    b = _Builder(task, cols, label)
    text_cols = [c for r, c in cols.items() if c is not None and r != "image"]
    if streaming:
        _read_stream(ds, cols, text_cols, root, b, src.limit)
    else:
        refs = _image_refs(ds, cols["image"])
        table = ds.select_columns(list(dict.fromkeys(text_cols))).to_dict() if text_cols else {}
        where = ("ds", locator, split, _cache_dir())
        for i, (has_bytes, p) in enumerate(refs):
            row = {c: table[c][i] for c in table}
            if has_bytes:
                image = (None, (__name__, where, cols["image"], i))
            else:
                image = (_resolve_path(root, p) if p else None, None)
            b.add(i, row, image)
    out = b.out
    out.image_root = root
    _stamp(out, locator, split, ds, streaming)
    return out


def _read_stream(ds, cols, text_cols, root, b: _Builder, limit: int | None) -> None:
    """Iterate a streamed dataset, keeping each row's encoded image; stops after ``limit`` examples."""
    import datasets

    feat = (ds.features or {}).get(cols["image"])
    if isinstance(feat, datasets.Image):
        ds = ds.cast_column(cols["image"], datasets.Image(decode=False))
    if limit is None:
        logger.warning("streaming without `limit`: every row is read and its image held in memory")
    for i, row in enumerate(ds):
        if limit is not None and len(b.out.rows) >= limit:
            break
        data, p = _stream_ref(row.get(cols["image"]))
        image = (None, (__name__, ("mem", data), None, i)) if data else ((_resolve_path(root, p) if p else None), None)
        b.add(i, {c: row.get(c) for c in text_cols}, image)


def _stamp(out: Parsed, locator: tuple, split: str | None, ds, streaming: bool) -> None:
    """The files (or, for a Hub dataset, the ids) that identify what was read, for the fingerprint."""
    kind = locator[0]
    if kind == "hub":
        out.stamps.append(f"hub:{locator[1]}@{locator[2] or 'default'}[{split}]")
        if not streaming:
            out.stamps.append(f"fingerprint:{getattr(ds, '_fingerprint', '')}")
        return
    split_dir = None
    if kind == "disk" and split is not None and os.path.isdir(os.path.join(locator[1], split)):
        split_dir = os.path.join(locator[1], split)
    base = locator[1] if kind in ("disk", "folder") else os.path.dirname(_local_files(locator)[0])
    for f in _local_files(locator, split_dir):
        size, mtime = _stat(f)
        if size > BIG_FILE:
            out.stamps.append(f"{os.path.relpath(f, base)}:{size}:{mtime}")
        else:
            out.files.append(f)


@functools.lru_cache(maxsize=16)
def _image_table(where: tuple, column: str, signature: tuple):
    _, locator, split, cache_dir = where
    obj = _load(locator, False, cache_dir, signature)
    ds = obj[split] if split is not None and _is_dict(obj) else obj
    return ds.select_columns([column]).with_format("arrow")


def image_bytes(where: tuple, column: str | None, index: int) -> bytes:
    """The encoded image of row ``index`` (what :attr:`Example.fetch` of this format calls).

    Args:
        where: ``("ds", locator, split, cache_dir)`` for a dataset on disk or in the ``datasets``
            cache (reopened, memory-mapped, in a worker process), or ``("mem", bytes)`` for a
            streamed row.
        column: the image column.
        index: the row.

    Returns:
        The image file's bytes (PNG, JPEG …).
    """
    if where[0] == "mem":
        return where[1]
    cell = _image_table(where, column, _signature(where[1]))[index].column(column)[0]
    value = cell.as_py()
    return value["bytes"] if isinstance(value, dict) else value


def detect(path: str) -> int:
    """A ``save_to_disk`` folder (3, ahead of imagefolder), a Parquet or Arrow file (1)."""
    if os.path.isdir(path):
        return 3 if _is_saved(path) else 0
    return 1 if path.lower().endswith((".parquet", ".arrow")) else 0


def path_source(path: str, images: str | None) -> dict:
    """``path`` is the dataset (``--images`` does not apply)."""
    return {"path": path}


def path_task(path: str) -> str:
    """``vqa`` when the dataset has a ``question`` column, else ``caption``."""
    try:
        locator, _ = _locate(path, "--data", None)
        ds, _ = _pick_split(_open(locator, False, "--data", path), None, "--data", path)
    except UserInputError:
        return "caption"
    return "vqa" if "question" in (ds.column_names or []) else "caption"


FORMAT = Format(
    name="hf",
    description="a Hugging Face `datasets` dataset: a `save_to_disk` folder, Parquet / Arrow / JSON-lines files "
    "or a Hub id (`path`), its `split`, columns named in `data.columns`",
    fields=frozenset({"path", "split", "streaming", "revision", "limit"}),
    spec_fields=frozenset({"columns"}),
    example=EXAMPLE,
    read=read,
    settings=settings,
    detect=detect,
    path_source=path_source,
    path_task=path_task,
)
