"""The Open Inference Protocol codec without a server: round trips, and every malformed body is a clear 4xx."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from serving import oip
from serving.oip import HEADER_LENGTH, OUTPUTS, ProtocolError, RequestedOutput

TEXTS = ["a fine film", "dull and long", "ünïcödé ✓ 🎬", ""]
LABELS = ["negative", "neutral", "positive"]  # three on purpose: nothing may assume two labels


def binary_body(texts: list[str], header_extra: dict | None = None, size: int | None = None,
                raw: bytes | None = None) -> tuple[bytes, str]:
    """A request as tritonclient frames it: JSON header, then the BYTES tensor."""
    data = oip.encode_bytes_elements([t.encode() for t in texts]) if raw is None else raw
    tensor = {"name": "text", "shape": [len(texts)], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(data) if size is None else size}}
    header = json.dumps({"inputs": [tensor], **(header_extra or {})}).encode()
    return header + data, str(len(header))


def decode(body: bytes, header_length: str | None) -> oip.InferCall:
    header, binary = oip.split_body(body, header_length)
    return oip.parse_request(json.loads(header), binary)


def fails(status: int, words: str, body: bytes, header_length: str | None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(body, header_length)
    assert caught.value.status == status, caught.value.error
    assert words in caught.value.error, caught.value.error
    return caught.value


# -- codec round trips -----------------------------------------------------------------------------------------------
def test_bytes_elements_round_trip_including_empty_and_multibyte() -> None:
    items = [t.encode() for t in TEXTS] + [b"\x00\xff" * 300]
    raw = oip.encode_bytes_elements(items)
    assert raw[:4] == struct.pack("<I", len(items[0])) and raw[4:4 + len(items[0])] == items[0]
    assert oip.decode_bytes_elements(raw) == items
    assert oip.decode_bytes_elements(b"") == []


@pytest.mark.parametrize(("datatype", "values", "itemsize"), [
    ("FP32", [0.25, 1e-8, 0.999, 3.5], 4), ("BOOL", [True, False, False, True], 1), ("BYTES", TEXTS, None)])
def test_output_datatypes_round_trip_little_endian(datatype: str, values: list, itemsize: int | None) -> None:
    raw = oip.encode_tensor(datatype, values)
    decoded = oip.decode_tensor(datatype, raw)
    if datatype == "BYTES":
        assert [v.decode() for v in decoded] == values
        return
    assert len(raw) == itemsize * len(values)
    np.testing.assert_allclose(decoded, np.asarray(values, dtype=np.float32), rtol=1e-7)
    if datatype == "FP32":
        assert raw[:4] == struct.pack("<f", 0.25)


def test_a_binary_request_decodes_to_its_texts() -> None:
    body, length = binary_body(TEXTS[:3], {"id": "r-7", "parameters": {"binary_data_output": True, "custom": 5}})
    call = decode(body, length)
    assert call.texts == TEXTS[:3] and call.id == "r-7"
    assert call.outputs == [RequestedOutput(name, True) for name in OUTPUTS]


def test_a_json_request_with_nested_data_decodes_and_defaults_to_json_outputs() -> None:
    header = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["x"], ["y"]],
                          "parameters": {"unknown": "ignored"}}]}
    call = decode(json.dumps(header).encode(), None)
    assert call.texts == ["x", "y"] and call.id is None
    assert call.outputs == [RequestedOutput(name, False) for name in OUTPUTS]


def test_requested_outputs_keep_their_order_and_form() -> None:
    outputs = [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}]
    body, length = binary_body(["x"], {"outputs": outputs})
    assert decode(body, length).outputs == [RequestedOutput("probabilities", True), RequestedOutput("label", False)]
    body, length = binary_body(["x"], {"outputs": [{"name": "label", "parameters": {"binary_data": False}}],
                                       "parameters": {"binary_data_output": True}})
    assert decode(body, length).outputs == [RequestedOutput("label", False)]


def test_a_binary_response_is_read_back_as_a_client_reads_it() -> None:
    results = [{"label": "positive", "probabilities": {"negative": 0.1, "neutral": 0.2, "positive": 0.7},
                "served_by": "student", "degraded": False},
               {"label": "negative", "probabilities": {"negative": 0.5, "neutral": 0.3, "positive": 0.2},
                "served_by": "teacher", "degraded": True}]
    values = oip.output_values(results, LABELS)
    asked = [RequestedOutput("probabilities", True), RequestedOutput("label", True), RequestedOutput("degraded", True),
             RequestedOutput("served_by", False)]
    encoded = oip.encode_response("cascade", "v3", "req-1", asked, values)
    assert encoded.media_type == oip.BINARY_CONTENT_TYPE
    header = json.loads(encoded.body[:encoded.header_length])
    assert encoded.headers == {HEADER_LENGTH: str(encoded.header_length)}
    assert header["id"] == "req-1" and [t["name"] for t in header["outputs"]] == [a.name for a in asked]
    offset, decoded = encoded.header_length, {}
    for tensor in header["outputs"]:
        if "data" in tensor:
            decoded[tensor["name"]] = tensor["data"]
            continue
        size = tensor["parameters"]["binary_data_size"]
        decoded[tensor["name"]] = oip.decode_tensor(tensor["datatype"], encoded.body[offset:offset + size])
        offset += size
    assert offset == len(encoded.body)
    probabilities = np.asarray(decoded["probabilities"]).reshape(header["outputs"][0]["shape"])
    np.testing.assert_allclose(probabilities, [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], rtol=1e-6)
    assert decoded["label"] == [b"positive", b"negative"] and decoded["degraded"] == [False, True]
    assert decoded["served_by"] == ["student", "teacher"]


def test_a_json_only_response_has_no_header_length() -> None:
    results = [{"label": "neutral", "probabilities": dict.fromkeys(LABELS, 1 / 3), "served_by": "student",
                "degraded": False}]
    encoded = oip.encode_response("student", "v1", "x", [RequestedOutput("label", False)],
                                  oip.output_values(results, LABELS))
    assert encoded.header_length is None and encoded.media_type == "application/json" and encoded.headers == {}
    assert json.loads(encoded.body)["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [1],
                                                    "data": ["neutral"]}]


def test_server_metadata_names_the_binary_extension() -> None:
    metadata = oip.server_metadata()
    assert metadata["name"] == "cascade" and "binary_tensor_data" in metadata["extensions"] and metadata["version"]


# -- malformed requests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", ["abc", "-5", "1.5", "", "٣"])
def test_a_header_length_that_is_not_a_count_is_400(length: str) -> None:
    body, _ = binary_body(["x"])
    fails(400, "whole number", body, length)


@pytest.mark.parametrize("delta", [1, 10_000])
def test_a_header_length_beyond_the_body_is_400(delta: int) -> None:
    body, _ = binary_body(["x"])
    fails(400, f"the body has {len(body)} bytes", body, str(len(body) + delta))


def test_a_zero_header_length_is_400() -> None:
    body, _ = binary_body(["x"])
    fails(400, "between 1 byte", body, "0")


def test_a_header_length_that_cuts_the_json_is_a_json_error() -> None:
    body, length = binary_body(["x"])
    header, _ = oip.split_body(body, str(int(length) - 3))
    with pytest.raises(json.JSONDecodeError):
        json.loads(header)


def test_a_truncated_body_is_400() -> None:
    body, length = binary_body(["hello world"])
    fails(400, "only", body[:-4], length)


def test_a_binary_data_size_smaller_than_the_data_leaves_bytes_over() -> None:
    body, length = binary_body(["hello"], size=4)
    fails(400, "belong to no input", body, length)


def test_extra_bytes_after_the_tensors_are_400() -> None:
    body, length = binary_body(["hello"])
    fails(400, "3 bytes after the JSON header", body + b"abc", length)


def test_a_cut_length_prefix_is_400() -> None:
    raw = oip.encode_bytes_elements([b"hello"]) + b"\x01\x00"
    fails(400, "truncated length prefix", *binary_body(["hello", "?"], raw=raw))


def test_an_element_longer_than_the_data_is_400() -> None:
    raw = struct.pack("<I", 1_000_000) + b"short"
    fails(400, "declares 1000000 bytes", *binary_body(["x"], raw=raw))


def test_an_element_that_is_not_utf8_is_400() -> None:
    raw = oip.encode_bytes_elements([b"\xff\xfe"])
    fails(400, "not UTF-8", *binary_body(["x"], raw=raw))


@pytest.mark.parametrize("size", [-1, "12", 1.5, True, None])
def test_a_binary_data_size_that_is_not_a_count_is_4xx(size: object) -> None:
    data = oip.encode_bytes_elements([b"x"])
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}
    header = json.dumps({"inputs": [tensor]}).encode()
    error = fails(422 if size is None else 400, "", header + data, str(len(header)))
    assert "binary_data_size" in error.error


def test_data_and_binary_data_size_together_are_400() -> None:
    data = oip.encode_bytes_elements([b"x"])
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"],
              "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    fails(400, "both data and binary_data_size", header + data, str(len(header)))


def test_a_shape_that_disagrees_with_the_elements_is_400() -> None:
    body, length = binary_body(["a", "b"])
    header = json.loads(body[:int(length)])
    header["inputs"][0]["shape"] = [3]
    new_header = json.dumps(header).encode()
    fails(400, "holds 3 elements but 2 were sent", new_header + body[int(length):], str(len(new_header)))
    fails(400, "negative dimension", json.dumps({"inputs": [{"name": "t", "shape": [-1], "datatype": "BYTES",
                                                             "data": ["a"]}]}).encode(), None)


def test_two_inputs_must_each_account_for_their_bytes() -> None:
    first, second = oip.encode_bytes_elements([b"a"]), oip.encode_bytes_elements([b"b"])
    tensors = [{"name": n, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(first)}}
               for n in ("a", "b")]
    header = json.dumps({"inputs": tensors}).encode()
    fails(400, "only 0 bytes", header + first, str(len(header)))
    fails(422, "exactly one input", header + first + second, str(len(header)))


def test_a_binary_non_bytes_input_is_422() -> None:
    data = np.asarray([1.0], dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    fails(422, "BYTES", header + data, str(len(header)))


def test_an_unknown_or_repeated_output_is_400() -> None:
    body, length = binary_body(["x"], {"outputs": [{"name": "logits"}]})
    fails(400, "unknown output 'logits'", body, length)
    body, length = binary_body(["x"], {"outputs": [{"name": "label"}, {"name": "label"}]})
    fails(400, "more than once", body, length)


def test_a_binary_flag_that_is_not_a_boolean_is_400() -> None:
    body, length = binary_body(["x"], {"outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]})
    fails(400, "binary_data must be true or false", body, length)
    body, length = binary_body(["x"], {"parameters": {"binary_data_output": 1}})
    fails(400, "binary_data_output must be true or false", body, length)


@pytest.mark.parametrize("header", [{"inputs": []}, {"inputs": [{"name": "t"}]}, [1, 2], {"inputs": "x"}])
def test_a_header_that_is_not_an_infer_request_is_422(header: object) -> None:
    fails(422, "invalid request", json.dumps(header).encode(), None)


def test_no_texts_and_non_string_data_are_422() -> None:
    fails(422, "non-empty list of strings",
          json.dumps({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}).encode(), None)
    fails(422, "non-empty list of strings",
          json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [3]}]}).encode(), None)
    fails(422, "neither data nor", json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES"}]}).encode(),
          None)


def test_a_compressed_body_is_refused_with_415() -> None:
    body, length = binary_body(["x"])
    with pytest.raises(ProtocolError) as caught:
        oip.split_body(body, length, "gzip")
    assert caught.value.status == 415 and "gzip" in caught.value.error
    assert oip.split_body(body, length, "identity")[1] == body[int(length):]


def test_a_fixed_size_tensor_of_a_partial_element_is_400() -> None:
    with pytest.raises(ProtocolError, match="whole number of FP32"):
        oip.decode_tensor("FP32", b"\x00" * 6)
    with pytest.raises(ProtocolError, match="not supported in binary form"):
        oip.decode_tensor("INT128", b"")
