"""Core errors name fields and suggest settings; each front end words them itself: the CLI and
the Python API as command-line options, the server as request fields, with no rewriting of
another layer's text."""

from __future__ import annotations

import pytest

from fastdllm import DecodeConfig, FastDLLMError
from fastdllm.server.protocol import APIError


def test_a_fix_is_an_option_on_the_command_line_and_a_field_over_http():
    with pytest.raises(FastDLLMError) as info:
        DecodeConfig(block_size=32, sub_block_size=5)
    e = info.value
    assert e.field == "sub_block_size" and e.fixes == (("sub_block_size", 8),)
    assert "--" not in e.message
    assert str(e) == "sub_block_size (5) must divide block_size (32); try --sub-block-size 8"
    api = APIError.from_user_error(e)
    assert api.param == "sub_block_size"
    assert api.message == 'sub_block_size (5) must divide block_size (32); try "sub_block_size": 8'


def test_the_server_names_fields_as_its_requests_do():
    e = FastDLLMError("no tokenizer", field="prompt", fixes=[("prompt_ids", [1, 2]), ("mode", "ar")])
    assert str(e) == "no tokenizer; try --prompt-ids 1,2 or --mode ar"
    assert APIError.from_user_error(e).message == 'no tokenizer; try "prompt": [1, 2] or "mode": "ar"'
    assert APIError.from_user_error(e).param == "prompt"
    assert APIError.from_user_error(e, {"prompt": "messages"}).param == "messages"
    with pytest.raises(FastDLLMError) as info:
        DecodeConfig(max_new_tokens=0)
    assert APIError.from_user_error(info.value).param == "max_tokens"
