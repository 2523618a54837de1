"""Hugging Face datasets read through their data files (Parquet, or the Arrow files of
``save_to_disk``), in two halves. Pure: no Ray, no torch.

The driver lists the rows (:func:`listed`): ids, texts and each row's data file and index in it,
reading no audio (Parquet: only the columns asked for; a local Arrow file: memory-mapped, so the
audio's pages are never touched). Each decode task then reads the audio bytes of its own rows
(:func:`audio_bytes`). The audio never passes through the driver: a dataset of any size needs the
driver's memory for its ids and texts only.
"""

from __future__ import annotations

import bisect
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import AudioError, ErrorKind, ManifestError

PREFIX = "hf:"
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
FILE = "file"  # the data file of a listed row
ROW = "row"  # the row's index within it
AUDIO_PATH = "audio_path"  # the file name the dataset's Audio column keeps


def data_files(path: str, split: str | None, config: str | None) -> list[str]:
    """The data files of ``split`` of the dataset at ``path``: a folder written by ``save_to_disk``
    (a local path or a URI), or ``hf:NAME`` (a Hub repository, or a local folder of data files,
    as ``datasets.load_dataset`` finds them; ``hf:NAME@REVISION`` for a branch, tag or commit).
    Raise :class:`ManifestError`."""
    if path.startswith(PREFIX):
        return _repository_files(path, split, config)
    path = storage.absolute(path)  # the workers read these files: not from our working directory
    if storage.info(storage.join(path, "dataset_dict.json")).type == pafs.FileType.File:
        splits = _read_json(storage.join(path, "dataset_dict.json"))["splits"]
        path = storage.join(path, _pick_split(path, split, splits))
    state = _read_json(storage.join(path, "state.json"))
    return [storage.join(path, f["filename"]) for f in state["_data_files"]]


def _read_json(location: str) -> dict:
    try:
        return json.loads(storage.read_bytes(location))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"--input {location}: cannot read it ({storage.reason(exc)})") from None


def _pick_split(path: str, split: str | None, splits: list[str]) -> str:
    if split is None and len(splits) == 1:
        return splits[0]
    if split in splits:
        return split
    raise ManifestError(f"input.hf_split = {split!r}: {path} has the splits {', '.join(splits)}; pick one")


def _repository_files(path: str, split: str | None, config: str | None) -> list[str]:
    import datasets  # imported here: seconds of imports that other inputs do without

    name, _, revision = path[len(PREFIX):].partition("@")
    try:
        # The builder resolves the repository's data files (hf:// URIs at a pinned revision) without
        # downloading them.
        found = datasets.load_dataset_builder(name, config, revision=revision or None).config.data_files
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise ManifestError(f"--input {path}: cannot load the dataset ({storage.reason(exc)})") from None
    if not found:
        raise ManifestError(f"--input {path}: the dataset lists no data files")
    files = list(found[_pick_split(path, split, list(found))])
    other = sorted({f.rsplit(".", 1)[-1] for f in files} - {"parquet", "arrow"})
    if other:
        raise ManifestError(
            f"--input {path}: its data files are {', '.join(other)}, not Parquet; read the Hub's Parquet "
            f"conversion of it: --input hf:{name}@refs/convert/parquet"
        )
    return files


def listed(files: list[str], audio_column: str, wanted: tuple[str, ...]) -> pa.Table:
    """One row per dataset row, no audio: :data:`FILE`, :data:`ROW`, :data:`AUDIO_PATH` and those of
    the ``wanted`` columns the files have. Raise :class:`ManifestError`."""
    tables = []
    for location in files:
        try:
            table = storage.retried(lambda location=location: _metadata(location, audio_column, wanted))
        except ManifestError:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise ManifestError(f"--input {location}: cannot read it ({storage.reason(exc)})") from None
        n = table.num_rows
        table = table.append_column(FILE, pa.array([location] * n, pa.string()))
        tables.append(table.append_column(ROW, pa.array(range(n), pa.int64())))
    if not tables:
        raise ManifestError(f"--input {files[0] if files else '?'}: the dataset has no rows")
    return pa.concat_tables(tables, promote_options="permissive")


def _metadata(location: str, audio_column: str, wanted: tuple[str, ...]) -> pa.Table:
    """One data file's rows with the audio column's file name in place of the audio."""

    def keep(schema: pa.Schema) -> list[str]:
        names = schema.names
        if audio_column not in names:
            raise ManifestError(
                f"input.audio_column = {audio_column!r}: {location} has no such column "
                f"(its columns: {', '.join(names)})"
            )
        kind = schema.field(audio_column).type
        if not (pa.types.is_struct(kind) and {"bytes", "path"} <= {kind.field(i).name for i in range(kind.num_fields)}):
            raise ManifestError(f"input.audio_column = {audio_column!r}: in {location} it is {kind}, not an Audio "
                                "column (a struct of bytes and path); name the dataset's Audio column")
        return [c for c in wanted if c in names]

    if location.endswith(".parquet"):
        with storage.open_file(location) as fh:
            pf = pq.ParquetFile(fh)
            kept = keep(pf.schema_arrow)
            # Only the file name of the audio struct: Parquet reads no byte of the audio itself.
            table = pf.read(columns=[f"{audio_column}.path", *kept])
        audio = table[audio_column].combine_chunks()
        return pa.table({AUDIO_PATH: pc.struct_field(audio, "path"), **{c: table[c] for c in kept}})
    with storage.open_stream(location) as fh:
        reader = pa.ipc.open_stream(fh)
        kept = keep(reader.schema)
        batches = [pa.record_batch([pc.struct_field(b.column(audio_column), "path"), *(b.column(c) for c in kept)],
                                   names=[AUDIO_PATH, *kept]) for b in reader]
    return pa.Table.from_batches(batches, schema=pa.schema([(AUDIO_PATH, pa.string()),
                                                            *((c, reader.schema.field(c).type) for c in kept)]))


def audio_bytes(location: str, rows: list[int], audio_column: str) -> list[bytes | str | AudioError]:
    """The audio of ``rows`` (indices within the data file ``location``), in their order: the bytes
    the row embeds; or, where it embeds none, the location of the audio file it names (a relative
    name taken from the data file's folder), as ``datasets`` reads it; or an :class:`AudioError` for
    a row that has neither. Raise :class:`AudioError` when the data file cannot be read
    (``not_found``, ``not_allowed``, ``unreadable``)."""
    try:
        found = storage.retried(lambda: _read_rows(location, sorted(set(rows)), audio_column))
    except FileNotFoundError:
        raise AudioError(ErrorKind.NOT_FOUND, f"{location}: no such file") from None
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        if storage.is_denied(exc):
            raise AudioError(ErrorKind.NOT_ALLOWED, f"{location}: access denied ({storage.reason(exc)})") from None
        raise AudioError(ErrorKind.UNREADABLE, f"{location}: {type(exc).__name__}: {storage.reason(exc)}") from None
    out: list[bytes | str | AudioError] = []
    for r in rows:
        data, name = found.get(r, (None, None))
        if data is not None:
            out.append(data)
        elif name:
            out.append(storage.beside(storage.parent(location), name))
        else:
            out.append(AudioError(ErrorKind.NOT_FOUND, f"{location} row {r}: no such row, or no audio in it"))
    return out


def _read_rows(location: str, rows: list[int], audio_column: str) -> dict[int, tuple[bytes | None, str | None]]:
    """The audio struct (bytes, file name) of ``rows`` (sorted), reading only what holds them:
    Parquet, their row groups; Arrow, the stream up to the last of them."""
    found: dict[int, tuple[bytes | None, str | None]] = {}

    def take(column: pa.Array, first: int, wanted: list[int]) -> None:
        data, names = pc.struct_field(column, "bytes"), pc.struct_field(column, "path")
        found.update((r, (data[r - first].as_py(), names[r - first].as_py())) for r in wanted)

    if location.endswith(".parquet"):
        with storage.open_file(location) as fh:
            pf = pq.ParquetFile(fh)
            starts = [0]
            for g in range(pf.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            for g in sorted({bisect.bisect_right(starts, r) - 1 for r in rows if r < starts[-1]}):
                column = pf.read_row_group(g, columns=[audio_column])[audio_column].combine_chunks()
                take(column, starts[g], [r for r in rows if starts[g] <= r < starts[g + 1]])
        return found
    with storage.open_stream(location) as fh:
        start = 0
        for batch in pa.ipc.open_stream(fh):
            end = start + batch.num_rows
            inside = rows[bisect.bisect_left(rows, start):bisect.bisect_left(rows, end)]
            if inside:
                take(batch.column(audio_column), start, inside)
            if end > rows[-1]:
                break
            start = end
    return found
