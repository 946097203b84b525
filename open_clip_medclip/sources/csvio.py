"""CSV reading shared by the report reader (`medclip label`) and the dataset adapters (`medclip shards build`).

- Fields of any length: the stdlib reader's 128 KB field limit is lifted (a long report is still one report).
- Strict, explicit text encoding (default UTF-8, a BOM is skipped): undecodable bytes are an error that names
  the file, the row, the line and the column, never silently replaced by U+FFFD. The file is decoded with
  `surrogateescape`, so a bad byte shows up in its own row instead of somewhere in an 8 KB read-ahead block.

Standard library only, so importing it costs nothing.
"""
from __future__ import annotations

import codecs
import csv
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_ENCODING = "utf-8"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def allow_large_csv_fields() -> None:
    """Lift the csv module's per-field limit (128 KB by default) to the largest value the platform takes."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on Windows
            limit //= 2


allow_large_csv_fields()


def check_encoding(encoding: str) -> str:
    """The codec name to open files with ('utf-8' reads with 'utf-8-sig' so a BOM is skipped); raises
    LookupError for an unknown encoding."""
    name = codecs.lookup(encoding).name
    return "utf-8-sig" if name == "utf-8" else encoding


def decode_error_message(where: str, text: str, encoding: str) -> str:
    """'WHERE: byte 0xe9 at character N is not valid ENCODING; ...' for a field holding an escaped byte."""
    match = _ESCAPED_BYTE.search(text)
    position = match.start() if match else 0
    byte = ord(match.group()) - 0xDC00 if match else 0
    return (f"{where}: byte {byte:#04x} at character {position} is not valid {encoding}; give the file's encoding "
            f"with --encoding (e.g. --encoding latin-1 or cp1252)")


def iter_csv_rows(path: Path, encoding: str = DEFAULT_ENCODING, delimiter: str = ",",
                  error: Callable[[str], Exception] = ValueError) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (row number, line number, fields) for every CSV row, header included (row 1).

    Raises `error(message)` naming the file, row, line and column for bytes that are not valid `encoding`.
    """
    codec = check_encoding(encoding)
    with path.open(newline="", encoding=codec, errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        start_line = 1
        for row_number, fields in enumerate(reader, start=1):
            for column, value in enumerate(fields):
                if _ESCAPED_BYTE.search(value):
                    where = f"{path}: row {row_number} (line {start_line}), column {column + 1}"
                    raise error(decode_error_message(where, value, encoding))
            yield row_number, start_line, fields
            start_line = reader.line_num + 1


def decode_text(data: bytes, where: str, encoding: str = DEFAULT_ENCODING,
                error: Callable[[str], Exception] = ValueError) -> str:
    """Strictly decode a whole file or archive member; the error names `where` and the line."""
    codec = check_encoding(encoding)
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{where}: line {line}: byte {data[exc.start]:#04x} is not valid {encoding}; give the file's "
                    f"encoding with --encoding (e.g. --encoding latin-1 or cp1252)") from None
