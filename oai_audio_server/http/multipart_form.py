"""An in-memory ``multipart/form-data`` parser for bodies already read (and size-capped).

Litestar's own form parsing spools uploads over 1 MiB to temporary files; this keeps
every part in memory, so nothing a client uploads touches the disk and its filename is
only ever a string.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from oai_audio_server.errors import InvalidRequestError, UnsupportedMediaTypeError
from oai_audio_server.http.buffers import assemble

MAX_PARTS = 32
STEP = 1024 * 1024  # a chunk larger than this is fed to the parser in steps


@dataclass
class FormPart:
    name: str
    data: bytes | memoryview  # a large upload is a view of anonymous memory (no join)
    filename: str | None = None
    content_type: str | None = None

    def text(self) -> str:
        try:
            return bytes(self.data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequestError(
                f"the form field '{self.name}' is not UTF-8 text", param=self.name
            ) from error


@dataclass
class _PartBuilder:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    pieces: list[bytes] = field(default_factory=list)


def parse_multipart(
    body: bytes | list[bytes], content_type: str | None
) -> dict[str, FormPart]:
    """Form parts by field name (the first part wins when a name repeats); ``body`` is
    the whole body or the chunks it arrived in."""
    parts: dict[str, FormPart] = {}
    chunks = [body] if isinstance(body, bytes) else body
    for part in parse_multipart_parts(chunks, content_type):
        parts.setdefault(part.name, part)
    return parts


def parse_multipart_parts(chunks: Iterable[bytes], content_type: str | None) -> list[FormPart]:
    """Every form part, in order (repeated names such as ``timestamp_granularities[]``).
    The body comes as the chunks it arrived in, and is parsed a chunk at a time, so that
    no step holds the GIL for the whole upload."""
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"this endpoint reads a multipart/form-data form, but the request's Content-Type "
            f"is {kind.decode('latin-1') or 'missing'}; send the form as multipart/form-data "
            "(HTTP clients do when given the form's fields and file)",
        )
    if not boundary:
        raise InvalidRequestError(
            "the request's Content-Type has no boundary; send the form as "
            "multipart/form-data with a boundary (HTTP clients add it when given the "
            "form's fields and file)",
            code="invalid_content_type",
        )
    parts: list[FormPart] = []
    count = 0
    current = _PartBuilder()

    def on_part_begin() -> None:
        nonlocal current, count
        count += 1
        if count > MAX_PARTS:
            raise InvalidRequestError(f"the form has more than {MAX_PARTS} parts")
        current = _PartBuilder()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current.header_value += data[start:end]

    def on_header_end() -> None:
        current.headers[bytes(current.header_field).lower()] = bytes(current.header_value)
        current.header_field.clear()
        current.header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.pieces.append(data[start:end])

    def on_part_end() -> None:
        disposition, params = parse_options_header(current.headers.get(b"content-disposition"))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            return
        key = name.decode("utf-8", "replace")
        filename = params.get(b"filename")
        part_type = current.headers.get(b"content-type")
        parts.append(
            FormPart(
                name=key,
                data=assemble(current.pieces),
                filename=filename.decode("utf-8", "replace") if filename is not None else None,
                content_type=part_type.decode("latin-1") if part_type else None,
            ),
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        for chunk in chunks:
            for start in range(0, len(chunk), STEP):
                parser.write(chunk[start : start + STEP])
        parser.finalize()
    except MultipartParseError as error:
        raise InvalidRequestError(f"the multipart body is malformed: {error}") from error
    return parts
