"""The Open Inference Protocol (KServe v2) on the wire: JSON and the binary tensor data extension.

Pure functions, no Ray and no web framework: the gateway hands in the body bytes and two headers and gets back
the texts to classify, then hands in the answers and gets back the body and headers to send. Kept apart from the
gateway so that every malformed framing case is a unit test without a server, and so that clients written for
Triton or KServe (``tritonclient.http`` sends binary tensors by default) work unchanged.

Binary tensor data: the body is a JSON header of ``Inference-Header-Content-Length`` bytes, then each tensor's raw
bytes in input order, ``parameters.binary_data_size`` bytes each. BYTES elements are a 4-byte little-endian
length, then that many bytes; fixed-size types are little-endian, BOOL one byte per element.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
from pydantic import ValidationError

from serving.schemas import OUTPUTS, InferRequest, InferRequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
BINARY_CONTENT_TYPE = "application/octet-stream"
# Little-endian numpy dtypes of the fixed-size datatypes the gateway sends (BYTES is length-prefixed instead).
FIXED_DTYPES = {"BOOL": np.dtype("?"), "FP32": np.dtype("<f4")}
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request the protocol cannot accept: answered as JSON with ``status`` (400 framing, 422 content)."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferCall:
    """What a v2 inference request asks for, decoded from either encoding."""

    id: str | None
    texts: list[str]
    outputs: list[RequestedOutput]


@dataclass(frozen=True)
class EncodedResponse:
    """A response body; ``header_length`` is set (and the content binary) when any output is sent as raw bytes."""

    body: bytes
    header_length: int | None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}

    @property
    def media_type(self) -> str:
        return "application/json" if self.header_length is None else BINARY_CONTENT_TYPE


def server_metadata() -> dict[str, Any]:
    """``GET /v2``: the version is the installed package's, so it cannot drift from a second copy."""
    return {"name": "cascade", "version": package_version("cascade-gateway"), "extensions": EXTENSIONS}


# -- codec ---------------------------------------------------------------------------------------------
def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    """BYTES tensor data: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def decode_bytes_elements(raw: bytes, tensor: str = "tensor") -> list[bytes]:
    """The inverse of :func:`encode_bytes_elements`; a cut length prefix or element is a 400."""
    items, offset = [], 0
    while offset < len(raw):
        if len(raw) - offset < _LENGTH.size:
            raise ProtocolError(400, f"{tensor}: BYTES element {len(items)} has a truncated length prefix "
                                     f"({len(raw) - offset} of {_LENGTH.size} bytes)")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length > len(raw) - offset:
            raise ProtocolError(400, f"{tensor}: BYTES element {len(items)} declares {length} bytes but only "
                                     f"{len(raw) - offset} remain")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def encode_tensor(datatype: str, values: Sequence[Any]) -> bytes:
    """Raw bytes of a flat tensor of the datatypes the gateway sends."""
    if datatype == "BYTES":
        return encode_bytes_elements([v.encode() if isinstance(v, str) else bytes(v) for v in values])
    return np.asarray(values, dtype=FIXED_DTYPES[datatype]).tobytes()


def decode_tensor(datatype: str, raw: bytes, tensor: str = "tensor") -> list[Any]:
    """Flat values from raw bytes; a size that is not a whole number of elements is a 400."""
    if datatype == "BYTES":
        return decode_bytes_elements(raw, tensor)
    dtype = FIXED_DTYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(400, f"{tensor}: datatype {datatype!r} is not supported in binary form; "
                                 f"use one of {['BYTES', *FIXED_DTYPES]}")
    if len(raw) % dtype.itemsize:
        raise ProtocolError(400, f"{tensor}: {len(raw)} bytes is not a whole number of {datatype} elements "
                                 f"({dtype.itemsize} bytes each)")
    return np.frombuffer(raw, dtype=dtype).tolist()


# -- requests ------------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | None, content_encoding: str | None = None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data that follows it (empty for a plain JSON request)."""
    if content_encoding and content_encoding.strip().lower() != "identity":
        raise ProtocolError(415, f"Content-Encoding {content_encoding!r} is not supported; send the body uncompressed")
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise ProtocolError(400, f"{HEADER_LENGTH} must be a whole number of bytes, got {header_length!r}")
    length = int(text)
    if not 0 < length <= len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes: the JSON header "
                                 "must be between 1 byte and the whole body")
    return body[:length], body[length:]


def parse_request(header: Any, binary: bytes) -> InferCall:
    """Validate the decoded JSON header, cut the binary data per input, and decode the texts.

    Framing faults (sizes that do not add up, cut elements, shapes that disagree with the data) are 400s;
    a well-formed request the gateway cannot serve (not one BYTES input, no texts) is a 422.
    """
    try:
        request = InferRequest.model_validate(header)
    except ValidationError as exc:
        raise ProtocolError(422, "invalid request", json.loads(exc.json(include_url=False, include_input=False))) \
            from exc
    chunks = _binary_chunks(request, binary)
    if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
        raise ProtocolError(422, "expected exactly one input tensor with datatype BYTES")
    tensor, chunk = request.inputs[0], chunks[0]
    if chunk is not None:
        texts = [_utf8(item, tensor.name, i) for i, item in enumerate(decode_bytes_elements(chunk, tensor.name))]
    else:
        texts = _flatten(tensor.data or [])
        if not all(isinstance(t, str) for t in texts):
            raise ProtocolError(422, "input data must be a non-empty list of strings")
    if any(d < 0 for d in tensor.shape):
        raise ProtocolError(400, f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    if math.prod(tensor.shape) != len(texts):
        raise ProtocolError(400, f"input {tensor.name!r}: shape {tensor.shape} holds {math.prod(tensor.shape)} "
                                 f"elements but {len(texts)} were sent")
    if not texts:
        raise ProtocolError(422, "input data must be a non-empty list of strings")
    return InferCall(request.id, texts, _requested_outputs(request))


def _binary_chunks(request: InferRequest, binary: bytes) -> list[bytes | None]:
    """Each input's raw bytes (None where it carries JSON ``data``); every byte must belong to an input."""
    chunks: list[bytes | None] = []
    offset = 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise ProtocolError(422, f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
            chunks.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(400, f"input {tensor.name!r}: binary_data_size must be a non-negative integer, "
                                     f"got {size!r}")
        if tensor.data is not None:
            raise ProtocolError(400, f"input {tensor.name!r} has both data and binary_data_size: send one")
        if size > len(binary) - offset:
            raise ProtocolError(400, f"input {tensor.name!r}: binary_data_size is {size} but only "
                                     f"{len(binary) - offset} bytes of binary data remain")
        chunks.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes after the JSON header belong to no input "
                                 f"(the inputs' binary_data_size add up to {offset})")
    return chunks


def _utf8(item: bytes, tensor: str, index: int) -> str:
    try:
        return item.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(400, f"input {tensor!r}: element {index} is not UTF-8 text: {exc}") from exc


def _flatten(data: list[Any]) -> list[Any]:
    """JSON tensor data may be nested by shape or flat; the protocol allows both."""
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _binary_flag(parameters: dict[str, Any] | None, key: str, default: bool, where: str) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{where}: parameters.{key} must be true or false, got {value!r}")
    return value


def _requested_outputs(request: InferRequest) -> list[RequestedOutput]:
    """The outputs asked for, in the asked order and form; all of them (JSON unless ``binary_data_output``)
    when the request names none."""
    default = _binary_flag(request.parameters, "binary_data_output", False, "request")
    if request.outputs is None:
        return [RequestedOutput(name, default) for name in OUTPUTS]
    asked: list[InferRequestedOutput] = request.outputs
    names = [o.name for o in asked]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ProtocolError(400, f"unknown output {unknown[0]!r}; outputs: {list(OUTPUTS)}")
    if len(set(names)) != len(names):
        raise ProtocolError(400, f"an output is asked for more than once: {names}")
    return [RequestedOutput(o.name, _binary_flag(o.parameters, "binary_data", default, f"output {o.name!r}"))
            for o in asked]


# -- responses -----------------------------------------------------------------------------------------
def output_values(results: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, tuple[list[int], list[Any]]]:
    """Each output's shape and flat values from the gateway's per-text answers; labels in manifest order."""
    n = len(results)
    return {
        "label": ([n], [r["label"] for r in results]),
        "probabilities": ([n, len(labels)], [r["probabilities"][label] for r in results for label in labels]),
        "served_by": ([n], [r["served_by"] for r in results]),
        "degraded": ([n], [bool(r["degraded"]) for r in results]),
    }


def encode_response(model_name: str, model_version: str, request_id: str, outputs: Sequence[RequestedOutput],
                    values: dict[str, tuple[list[int], list[Any]]]) -> EncodedResponse:
    """The response body: plain JSON, or a JSON header followed by the binary outputs in the order listed."""
    tensors, raw = [], []
    for output in outputs:
        shape, data = values[output.name]
        datatype = OUTPUTS[output.name]
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            raw.append(encode_tensor(datatype, data))
            tensor["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            tensor["data"] = data
        tensors.append(tensor)
    header = json.dumps({"model_name": model_name, "model_version": model_version, "id": request_id,
                         "outputs": tensors}).encode()
    if not raw:
        return EncodedResponse(header, None)
    return EncodedResponse(header + b"".join(raw), len(header))


def model_metadata(name: str, version: str, labels: int) -> dict[str, Any]:
    """``GET /v2/models/{name}``: one BYTES input of texts; the outputs of ``OUTPUTS``."""
    platform = "cascade" if name == "cascade" else ("onnxruntime" if name == "student" else "pytorch")
    return {
        "name": name,
        "versions": [version],
        "platform": platform,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": output, "datatype": datatype, "shape": [-1, labels] if output == "probabilities" else [-1]}
                    for output, datatype in OUTPUTS.items()],
    }
