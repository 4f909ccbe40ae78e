"""Checks that every data source can be read, before any process group exists and again when reading fails.

:func:`check_sources` opens every file of every local source and reads its first ``sample_lines`` records: the
file exists and is not empty, text decodes as UTF-8, every JSONL line parses as an object carrying ``text_field``
as a string, a Parquet file has the ``text_field`` column. The launcher calls it before it starts anything, so a
broken corpus costs no process group and leaves no output folder.

A problem deeper inside a file (past the sample) surfaces later, as an exception from ``datasets`` that names
neither file nor line. :func:`locate_problem` then scans the source's files completely and returns the same
:class:`DataSourceError` the early check would have given, so the rank that met it can say where it is.

One check per file format, keyed by the ``datasets`` builder name (``text``, ``json``, ``parquet``);
:func:`register_format_check` adds a format (e.g. Megatron indexed ``.bin``/``.idx`` pairs).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mora_dist.data.sources import list_files, reads_like_hub
from mora_dist.errors import MoRAConfigError

SAMPLE_LINES = 1000  # records read per file by the early check; locate_problem reads all


class DataSourceError(MoRAConfigError):
    """A data source cannot be read; the message names the source, the file and (where there is one) the line.

    Attributes:
        source: the source's ``name`` in the config.
        file: the file at fault (``None`` when the problem is the source's path itself).
        line: 1-based line (text, JSONL) or row (Parquet) number, or ``None``.
    """

    def __init__(self, source: str, file: str | None, line: int | None, problem: str, fix: str) -> None:
        where = f"{file}" + (f", line {line}" if line is not None else "") if file else "its path"
        super().__init__(f"data source {source!r}: {where}: {problem}; {fix}")
        self.source, self.file, self.line = source, file, line


# A format check reads ``path`` and raises DataSourceError on the first problem in its first ``limit`` records
# (all of them when ``limit`` is None). Arguments: source name, path, text_field, limit.
FormatCheck = Callable[[str, Path, str, "int | None"], None]


def _open_binary(path: Path) -> IO[bytes]:
    """The decompressed bytes of ``path`` (gzip, bz2, xz by suffix; zstd when ``zstandard`` is installed)."""
    suffix = path.suffix
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard  # installed with datasets' zstd support; without it datasets cannot read the file either

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def _lines(source: str, path: Path, limit: int | None) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of the first ``limit`` lines, decoded as UTF-8 (an error names the line)."""
    try:
        with _open_binary(path) as fh:
            for number, raw in enumerate(fh, start=1):
                if limit is not None and number > limit:
                    return
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataSourceError(source, str(path), number,
                                          f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})",
                                          "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataSourceError(source, str(path), None, f"cannot be read ({exc})",
                              "check the file and its compression suffix") from None


def check_text(source: str, path: Path, text_field: str, limit: int | None) -> None:
    """Plain text: decodes as UTF-8 and holds some non-blank text."""
    any_text = False
    for _, line in _lines(source, path, limit):
        any_text = any_text or bool(line.strip())
    if not any_text:
        raise DataSourceError(source, str(path), None, "holds no text", "remove the file or fill it")


def check_jsonl(source: str, path: Path, text_field: str, limit: int | None) -> None:
    """JSON lines: each non-blank line is an object with ``text_field`` holding a string."""
    records = 0
    for number, line in _lines(source, path, limit):
        if not line.strip():
            continue
        if records == 0 and line.lstrip().startswith("[") and ".json" in path.suffixes[-2:]:
            return _check_json_array(source, path, text_field)  # a .json file holding one array
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSourceError(source, str(path), number, f"not valid JSON ({exc.msg} at column {exc.colno})",
                                  "fix or remove the line (JSONL: one JSON object per line)") from None
        _check_record(source, path, number, record, text_field)
        records += 1
    if records == 0:
        raise DataSourceError(source, str(path), None, "holds no JSON records", "remove the file or fill it")


def _check_json_array(source: str, path: Path, text_field: str) -> None:
    """A ``.json`` file holding one array of records (``datasets`` reads those too)."""
    with _open_binary(path) as fh:
        try:
            records = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataSourceError(source, str(path), getattr(exc, "lineno", None), f"not valid JSON ({exc})",
                                  "fix the file") from None
    if not records:
        raise DataSourceError(source, str(path), None, "holds an empty JSON array", "remove the file or fill it")
    for i, record in enumerate(records):
        _check_record(source, path, None, record, text_field, what=f"record {i}")


def _check_record(source: str, path: Path, number: int | None, record: Any, text_field: str, *,
                  what: str = "the record") -> None:
    if not isinstance(record, dict):
        raise DataSourceError(source, str(path), number, f"{what} is a {type(record).__name__}, not an object",
                              "write one JSON object per line")
    if text_field not in record:
        raise DataSourceError(source, str(path), number,
                              f"{what} has no field text_field={text_field!r} (its fields: {sorted(record)[:8]})",
                              "add the field, or set the source's text_field to the field holding the text")
    if not isinstance(record[text_field], str):
        raise DataSourceError(source, str(path), number,
                              f"{what}'s {text_field!r} is {type(record[text_field]).__name__}, not a string",
                              "store the text as a JSON string")


def check_parquet(source: str, path: Path, text_field: str, limit: int | None) -> None:
    """Parquet: readable, has rows, has the ``text_field`` column of strings (the rows read hold no nulls)."""
    import pyarrow as pa  # only parquet sources need pyarrow
    import pyarrow.parquet as pq  # only parquet sources need pyarrow

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataSourceError(source, str(path), None, f"is not a readable Parquet file ({exc})",
                              "check the file") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataSourceError(source, str(path), None, f"has no column text_field={text_field!r} (its columns: "
                              f"{names})", "set the source's text_field to the column holding the text")
    column_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataSourceError(source, str(path), None, f"column {text_field!r} is {column_type}, not a string",
                              "store the text as a string column")
    if pf.metadata.num_rows == 0:
        raise DataSourceError(source, str(path), None, "has no rows", "remove the file or fill it")
    row = 0
    for group in range(pf.num_row_groups):
        values = pf.read_row_group(group, columns=[text_field]).column(0)
        if values.null_count:
            first = next(i for i, v in enumerate(values.is_null().to_pylist()) if v)
            raise DataSourceError(source, str(path), row + first + 1, f"row {row + first + 1} has a null "
                                  f"{text_field!r}", "drop or fill the rows without text")
        row += len(values)
        if limit is not None and row >= limit:
            return


_CHECKS: dict[str, FormatCheck] = {"text": check_text, "json": check_jsonl, "parquet": check_parquet}


def register_format_check(builder: str, check: FormatCheck) -> None:
    """Use ``check`` for the files :func:`~mora_dist.data.sources.list_files` assigns to ``builder``."""
    _CHECKS[builder] = check


def _check_source(source, *, limit: int | None) -> None:
    """One config ``DataSource``. Hub datasets and local copies in the hub's layout are read by ``datasets``'
    own loader and not checked here. Every file ``list_files`` names (a Megatron prefix's ``.bin``/``.idx`` too)
    must exist and be non-empty; its contents are checked where a check is registered for its builder."""
    if reads_like_hub(source.path, source.hub_config, source.eval_split):
        return
    try:
        builder, files = list_files(source.path, source.format)
    except MoRAConfigError as exc:
        raise DataSourceError(source.name, None, None, str(exc), "fix data.sources.<i>.path") from None
    check = _CHECKS.get(builder)
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataSourceError(source.name, name, None, "does not exist or is not a file", "fix the path")
        if path.stat().st_size == 0:
            raise DataSourceError(source.name, name, None, "is empty (0 bytes)", "remove the file or fill it")
        if check is not None:
            check(source.name, path, source.text_field, limit)


def check_sources(sources, *, sample_lines: int = SAMPLE_LINES) -> None:
    """Open every local source of ``data.sources`` and read the first ``sample_lines`` records of each file.

    Raises:
        DataSourceError: the first problem found, naming source, file and line.
    """
    for source in sources:
        _check_source(source, limit=sample_lines)


def locate_problem(source) -> DataSourceError | None:
    """Scan every file of ``source`` completely; the first problem as an error (not raised), or ``None``."""
    try:
        _check_source(source, limit=None)
    except DataSourceError as exc:
        return exc
    return None
