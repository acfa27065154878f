"""The request schema and its messages, the gRPC → schema conversion, the error mapping of
pool failures, and the checked-in gRPC stubs (pure logic, no Ray)."""

from __future__ import annotations

import pytest
from pdserve.router.errors import (
    BadRequest,
    InternalError,
    Overloaded,
    ServiceUnavailable,
    describe_validation,
)
from pdserve.router.grpc_service import request_body
from pdserve.router.proto import STUBS, generate
from pdserve.router.proto import pdserve_pb2 as pb
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest
from pydantic import ValidationError


def message(cls, body: dict) -> str:
    with pytest.raises(ValidationError) as e:
        cls.model_validate(body)
    return describe_validation(list(e.value.errors()))[0]


def test_messages_name_the_field_and_what_to_send():
    assert message(CompletionRequest, {"prompt": "x", "max_tokens": "5"}) == \
        "max_tokens: Input should be a valid integer (got '5')"
    assert message(CompletionRequest, {"prompt": [1, 2.5]}).startswith("prompt: prompt must be")
    assert message(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "input_audio"}]}]}) == (
        "messages[0].content: content part 1 has type 'input_audio'; only 'text' parts are "
        "supported (this model reads text only)")
    lone = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 1}
    assert message(ChatCompletionRequest, lone) == "top_logprobs requires logprobs=true"
    assert message(CompletionRequest, {}) == "prompt: this field is required"


def test_json_integers_and_nulls():
    r = CompletionRequest.model_validate({"prompt": [1.0, 2], "max_tokens": 3.0, "n": None,
                                          "temperature": None, "stop": None, "seed": 0})
    assert r.prompt == [1, 2] and r.max_tokens == 3 and r.n == 1
    assert r.temperature_value == 1.0 and r.top_p_value == 1.0 and r.stop_list == []
    assert CompletionRequest.model_validate({"prompt": "x", "stop": "END"}).stop_list == ["END"]


def test_validation_error_shapes():
    assert describe_validation([{"type": "json_invalid", "loc": ("body", 7),
                                 "ctx": {"error": "Expecting value"}}])[0] == \
        "the request body is not valid JSON (Expecting value at character 7); send a JSON object"
    assert describe_validation([{"type": "missing", "loc": ("body",)}])[0].startswith(
        "the request body is empty")
    assert describe_validation([{"type": "float_parsing", "loc": ("header", "x-request-timeout"),
                                 "msg": "Input should be a valid number", "input": "soon"}]) == (
        "the x-request-timeout header: Input should be a valid number (got 'soon')",
        "x-request-timeout")


def test_grpc_request_becomes_the_same_model():
    req = pb.GenerateRequest(prompt="hi", max_tokens=5, temperature=0.0, top_k=3, seed=1,
                             stop=["a"], ignore_eos=True, logprobs=2)
    body = request_body(req)
    assert isinstance(body, CompletionRequest)
    assert (body.prompt, body.max_tokens, body.temperature, body.top_k, body.seed,
            body.stop_list, body.ignore_eos, body.logprobs) == ("hi", 5, 0.0, 3, 1, ["a"], True, 2)
    unset = request_body(pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[4, 5])))
    assert unset.prompt == [4, 5] and unset.max_tokens is None and unset.temperature is None
    chat = request_body(pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="hey")]), logprobs=3))
    assert isinstance(chat, ChatCompletionRequest)
    assert chat.messages[0].text() == "hey" and chat.logprobs and chat.top_logprobs == 3
    with pytest.raises(BadRequest, match="no input"):
        request_body(pb.GenerateRequest())
    with pytest.raises(BadRequest, match="role"):
        request_body(pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="robot", content="x")])))
    with pytest.raises(BadRequest, match="top_p"):
        request_body(pb.GenerateRequest(prompt="x", top_p=0.0))


def test_pool_failures_map_to_client_errors():
    import ray.exceptions
    from pdserve.router.frontend import translate
    from pdserve.router.orchestrator import Unavailable
    from pdserve.workers.scheduler import QueueFull

    e = translate(QueueFull("waiting queue is full (256 requests)"), 2)
    assert isinstance(e, Overloaded) and e.headers["Retry-After"] == "2"
    assert isinstance(translate(Unavailable("no decode instance has free KV blocks"), 1),
                      ServiceUnavailable)
    assert translate(ServiceUnavailable("x"), 1).grpc_code == "UNAVAILABLE"
    # as raised through a Serve handle: Ray's wrapper around the replica's exception
    wrapped = ray.exceptions.RayTaskError("prefill", "Traceback ...",
                                          QueueFull("full")).as_instanceof_cause()
    assert isinstance(translate(wrapped, 1), Overloaded)
    bad = translate(ValueError("prompt token ids must be in [0, 384)"), 1)
    assert isinstance(bad, BadRequest) and bad.status == 400
    other = translate(RuntimeError("boom"), 1)
    assert isinstance(other, InternalError) and other.status == 500 and "boom" in other.message


def test_checked_in_stubs_match_the_proto(tmp_path):
    from pdserve.router.proto import HERE

    for fresh in generate(tmp_path):
        assert fresh.read_text() == (HERE / fresh.name).read_text(), (
            f"{fresh.name} is stale: run `python -m pdserve.router.proto`")
    assert len(STUBS) == 2
