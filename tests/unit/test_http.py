"""The HTTP side apart from the routes (serving/http.py): JSON depth, the API key, the per-request limits."""

import json

import pytest
from pydantic import SecretStr
from starlette.datastructures import Headers

from serving.http import MAX_JSON_DEPTH, ApiError, authorized, check_labelled, check_texts, json_depth_exceeds
from serving.settings import AuthSettings, LimitSettings


def test_deep_json_is_caught_before_the_parser_recurses() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):  # the hole: the stdlib parser recurses
        json.loads(deep)
    assert json_depth_exceeds(deep)
    assert json_depth_exceeds(b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1))
    ordinary = json.dumps({"texts": ["[[[[" * 100, "a \\\" [ {"], "inputs": [[["x"]]]}).encode()
    assert not json_depth_exceeds(ordinary)  # brackets inside strings do not count


@pytest.mark.parametrize(("header", "ok"), [("Bearer s3cret", True), ("bearer s3cret ", True), ("Bearer wrong", False),
                                            ("Basic s3cret", False), ("", False)])
def test_the_api_key_is_a_bearer_token(header: str, ok: bool) -> None:
    auth = AuthSettings(api_key=SecretStr("s3cret"))
    assert authorized(auth, Headers({"authorization": header})) is ok
    assert authorized(AuthSettings(api_key=None), Headers({}))


def test_the_per_request_limits_name_what_is_wrong() -> None:
    limits = LimitSettings(max_texts=2, max_chars=5)
    check_texts(["ok", "fine"], limits)
    for texts, message in ((["a", "b", "c"], "too many texts"), (["a", " \t"], r"texts\[1\] is empty"),
                           (["toolong"], r"texts\[0\] has 7 characters")):
        with pytest.raises(ApiError, match=message) as caught:
            check_texts(texts, limits)
        assert caught.value.status == 422
    with pytest.raises(ApiError, match="2 texts but 1 labels"):
        check_labelled(["a", "b"], ["pos"], limits)
