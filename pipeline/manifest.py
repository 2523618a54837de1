"""Read any supported input into one normalised manifest table. Pure: no Ray.

Every input becomes a table with the columns ``id`` (unique string), ``path`` (string),
``dataset_row`` (the row's index in the data file ``path``, set only for Hugging Face datasets)
and ``reference`` (string or null). The manifest is read on the driver, not by Ray Data readers:
the job needs global row numbers for its error messages and a whole-manifest duplicate-id check before any
work starts, and a manifest (paths and texts, not audio) fits in memory even for 10^7 rows.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
import soundfile as sf

from pipeline import bundled, hf, storage
from pipeline import schema as S
from pipeline.config import InputConfig
from pipeline.errors import ManifestError

# What libsndfile reads, by extension; matched case-insensitively when listing a folder.
_GLOB = re.compile(r"[*?[]")
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64"}
    | {"." + fmt.lower() for fmt in sf.available_formats()}
)


def detect_format(path: str) -> str:
    """Guess the input kind from its name or folder contents (``input.format = auto``)."""
    if path.startswith(hf.PREFIX):
        return "hf"
    if _GLOB.search(path) and not _exists(path):  # "take[2].csv" is a file's name, not a pattern
        return "glob"
    if _is_folder(path):
        return "hf" if any(_exists(storage.join(path, m)) for m in hf.SAVED_MARKERS) else "folder"
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if ".csv" in suffixes or ".tsv" in suffixes:
        return "csv"
    if {".jsonl", ".json", ".ndjson"} & set(suffixes):
        return "jsonl"
    if {".parquet", ".pq"} & set(suffixes):
        return "parquet"
    if p.suffix.lower() in AUDIO_EXTENSIONS:
        return "audio"
    if not _exists(path):
        raise ManifestError(f"--input {path}: no such file or folder")
    raise ManifestError(
        f"--input {path}: cannot tell the format from the name; name it .csv, .jsonl or .parquet, "
        "or set input.format"
    )


def _info(path: str) -> pafs.FileInfo:
    try:
        return storage.info(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"--input {path}: cannot reach it ({storage.reason(exc)})") from None


def _is_folder(path: str) -> bool:
    return _info(path).type == pafs.FileType.Directory


def _exists(path: str) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def read_manifest(cfg: InputConfig) -> pa.Table:
    """Read ``cfg.path`` into the normalised manifest table; raise :class:`ManifestError`."""
    if not cfg.path:
        raise ManifestError("input.path is not set: pass --input MANIFEST_OR_FOLDER")
    path = bundled.input_path(cfg.path)
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "folder":
        table = _list_folder(storage.absolute(path))  # absolute: workers do not share our working directory
    elif fmt == "glob":
        table = _list_glob(path)
    elif fmt == "audio":
        if not _exists(path):
            raise ManifestError(f"--input {path}: no such file")
        table = _files_table([(os.path.basename(path.rstrip("/")), storage.absolute(path))])
    elif fmt == "hf":
        table = _read_hf(path, cfg)
    else:
        table = _normalize(_read_table(path, fmt), source=path, where=_where(path, fmt))
    check_unique_ids(table)
    return table


def _where(path: str, fmt: str):
    """Name row ``i`` the way a user finds it in the file."""
    first = {"csv": 2, "jsonl": 1}.get(fmt)  # CSV has a header line
    if first is None:
        return lambda i: f"{path} row {i}"
    return lambda i: f"{path} line {i + first}"


def _read_table(path: str, fmt: str) -> pa.Table:
    source: str | pa.BufferReader = path
    if storage.is_uri(path):  # read whole (a manifest is paths and texts) and retried, then parsed as a local file
        try:
            source = pa.BufferReader(storage.read_bytes(path))
        except FileNotFoundError:
            raise ManifestError(f"--input {path}: no such object") from None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"--input {path}: cannot read it ({storage.reason(exc)})") from None
    try:
        if fmt == "csv":
            # Keep ids and paths as written: type inference would turn id "007" into 7.
            text_cols = (S.ID, *S.PATH_ALIASES, *S.REFERENCE_ALIASES)
            convert = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in text_cols}, strings_can_be_null=True
            )
            parse = pacsv.ParseOptions(delimiter="\t" if path.lower().endswith(".tsv") else ",")
            return pacsv.read_csv(source, parse_options=parse, convert_options=convert)
        if fmt == "jsonl":
            return pajson.read_json(source)
        return pq.read_table(source)
    except FileNotFoundError:
        raise ManifestError(f"--input {path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        where = _first_bad_json_line(path) if fmt == "jsonl" else None
        raise ManifestError(where or f"--input {path}: cannot read it as {fmt} ({exc})") from None


def _first_bad_json_line(path: str) -> str | None:
    """Name the first line that is not a JSON object (Arrow's error counts rows within a block)."""
    text = storage.read_bytes(path).decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{path} line {number}: not valid JSON ({exc.msg}); one object per line expected"
        if not isinstance(value, dict):
            return f"{path} line {number}: a JSON {type(value).__name__}, expected an object"
    return None


def _pick(table: pa.Table, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in table.column_names), None)


def _as_strings(col: pa.ChunkedArray) -> list:
    return col.cast(pa.string()).to_pylist()


def _normalize(table: pa.Table, source: str, where) -> pa.Table:
    """Map a manifest's columns onto the manifest schema; relative paths resolve against its folder,
    to absolute paths (or URIs, beside a manifest in an object store): a worker's working directory
    is not the driver's."""
    base_dir = storage.parent(source)
    path_col = _pick(table, S.PATH_ALIASES)
    if path_col is None:
        raise ManifestError(
            f"{source}: no audio path column; expected one of "
            f"{', '.join(S.PATH_ALIASES)}, found {', '.join(table.column_names) or 'none'}"
        )
    raw_paths = _as_strings(table[path_col])
    for i, p in enumerate(raw_paths):
        if not p:
            raise ManifestError(f"{where(i)}: the {path_col} column is empty")
    paths = [storage.beside(base_dir, p) for p in raw_paths]
    if S.ID in table.column_names:
        ids = _as_strings(table[S.ID])
        for i, v in enumerate(ids):
            if not v:
                raise ManifestError(f"{where(i)}: the id column is empty")
    else:
        # Stable across runs and machines: the path as the manifest wrote it.
        ids = [os.path.normpath(p) for p in raw_paths]
    ref_col = _pick(table, S.REFERENCE_ALIASES)
    refs = _as_strings(table[ref_col]) if ref_col else [None] * len(ids)
    return _manifest(ids, paths, refs)


def _manifest(ids: list[str], paths, references=None, dataset_rows=None) -> pa.Table:
    """The manifest table of these columns; no references or dataset rows: nulls."""
    n = len(ids)
    return pa.table({S.ID: ids, S.PATH: paths,
                     S.DATASET_ROW: pa.nulls(n, pa.int64()) if dataset_rows is None else dataset_rows,
                     S.REFERENCE: pa.nulls(n, pa.string()) if references is None else references},
                    schema=S.MANIFEST_SCHEMA)


def _list_folder(root: str) -> pa.Table:
    """Every audio file below the folder or prefix ``root``; ids are their paths relative to it."""
    files = [(name, where) for name, where in _listed(root) if os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS]
    if not files:
        raise ManifestError(
            f"--input {root}: no audio files below it (looked for {', '.join(sorted(AUDIO_EXTENSIONS))})"
        )
    return _files_table(files)


def _listed(root: str) -> list[tuple[str, str]]:
    try:
        return storage.list_files(root)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"--input {root}: cannot list it ({storage.reason(exc)})") from None


def _list_glob(pattern: str) -> pa.Table:
    """The files matching a glob (``*``, ``?``, ``[...]``; ``**`` crosses folders), local or in an
    object store; ids are their paths relative to the pattern's fixed leading folder."""
    head = pattern[: _GLOB.search(pattern).start()]
    root = head if head.endswith("/") else storage.parent(head) if head else "."
    root = storage.absolute(root)
    rest = storage.absolute(pattern)[len(root):].lstrip("/")
    regex = _glob_regex(rest)
    files = [(name, where) for name, where in _listed(root) if regex.fullmatch(name)]
    if not files:
        raise ManifestError(f"--input {pattern}: no file matches it")
    return _files_table(files)


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex over ``/``-separated names (fnmatch's ``*`` would cross folders; here only
    ``**`` does, and ``**/`` is any number of folders, none included)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _files_table(files: list[tuple[str, str]]) -> pa.Table:
    """The manifest of ``(id, location)`` audio files, without references."""
    ids = [name for name, _ in files]
    return _manifest(ids, [where for _, where in files])


def _read_hf(path: str, cfg: InputConfig) -> pa.Table:
    """A Hugging Face dataset's rows, each pointing at its data file and row (no audio: see
    :mod:`pipeline.hf`)."""
    files = hf.data_files(path, cfg.hf_split, cfg.hf_config)
    table = hf.listed(files, cfg.audio_column, (S.ID, *S.REFERENCE_ALIASES))
    names = table[hf.AUDIO_PATH].to_pylist()
    if S.ID in table.column_names:
        ids = _as_strings(table[S.ID])
    elif all(names) and len(set(names)) == len(names):
        ids = names
    else:
        width = len(str(len(names)))
        ids = [f"{i:0{width}d}" for i in range(len(names))]
    ref_col = _pick(table, S.REFERENCE_ALIASES)
    return _manifest(ids, table[hf.FILE], _as_strings(table[ref_col]) if ref_col else None, table[hf.ROW])


def check_unique_ids(table: pa.Table) -> None:
    """Raise :class:`ManifestError` naming the first duplicated ids, if any."""
    counts = pc.value_counts(table[S.ID].combine_chunks())
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        shown = ", ".join(f"{v['values']!r} ({v['counts']}x)" for v in dup[:5].to_pylist())
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise ManifestError(f"duplicate ids in the input: {shown}{more}; ids must be unique")
