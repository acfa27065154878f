"""The ``pdserve.chunks`` request extension → Job chunk spans (pure logic, no Ray)."""

from __future__ import annotations

import pytest
from pdserve.router.errors import BadRequest, describe_validation
from pdserve.router.frontend import Frontend
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.workers.llm import load_tokenizer
from pydantic import ValidationError

DOC_A = "The quick brown fox jumps over the lazy dog."
DOC_B = "Un café crème, s'il vous plaît."


@pytest.fixture(scope="module")
def front(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    return Frontend(tok, "tiny", 8192, len(tok), orchestrator=None)


def test_completion_chunks_are_tokenized_on_their_own(front):
    prompt = f"Docs:\n{DOC_A}\n{DOC_B}\nQuestion: who?"
    body = CompletionRequest.model_validate(
        {"prompt": prompt, "pdserve": {"chunks": [DOC_A, DOC_B], "recompute_ratio": 1.0}})
    job = front.completion_job(body)
    enc = lambda s: front.tok(s, add_special_tokens=False)["input_ids"]
    (s0, e0), (s1, e1) = job.chunks.spans
    assert job.prompt_ids[s0:e0] == enc(DOC_A) and job.prompt_ids[s1:e1] == enc(DOC_B)
    assert job.prompt_ids == enc("Docs:\n") + enc(DOC_A) + enc("\n") + enc(DOC_B) + \
        enc("\nQuestion: who?")
    assert job.chunks.recompute_ratio == 1.0
    assert front.tok.decode(job.prompt_ids) == prompt
    # without the extension nothing changes
    plain = front.completion_job(CompletionRequest.model_validate({"prompt": prompt}))
    assert plain.chunks is None and plain.prompt_ids == front.tok(prompt)["input_ids"]


def test_chat_chunks_inside_messages(front):
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": f"Use these documents.\n{DOC_A}"},
                     {"role": "user", "content": f"{DOC_B}\nWhat costs two euros?"}],
        "pdserve": {"chunks": [DOC_A, DOC_B]}})
    job = front.chat_job(body)
    assert [front.tok.decode(job.prompt_ids[s:e]) for s, e in job.chunks.spans] == [DOC_A, DOC_B]
    assert job.chunks.recompute_ratio is None
    msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = front.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert front.tok.decode(job.prompt_ids) == text


def test_token_id_chunks(front):
    ids = [5, 6, 7, 8, 9, 10, 11, 7, 8]
    job = front.completion_job(CompletionRequest.model_validate(
        {"prompt": ids, "pdserve": {"chunks": [[7, 8], [10, 11, 7]]}}))
    assert job.chunks.spans == ((2, 4), (5, 8))


def test_chunk_errors_say_what_to_fix(front):
    with pytest.raises(BadRequest, match=r"pdserve.chunks\[1\] does not occur"):
        front.completion_job(CompletionRequest.model_validate(
            {"prompt": f"{DOC_B} {DOC_A}", "pdserve": {"chunks": [DOC_A, DOC_B]}}))  # order
    with pytest.raises(BadRequest, match="is text but the prompt is token ids"):
        front.completion_job(CompletionRequest.model_validate(
            {"prompt": [1, 2], "pdserve": {"chunks": ["x"]}}))
    for ext, msg in [({"chunks": [""]}, "must be a non-empty string"),
                     ({"chunks": "abc"}, "must be a list"),
                     ({"chunks": ["a"], "recompute_ratio": 1.5}, "less than or equal to 1")]:
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate({"prompt": "abc", "pdserve": ext})
        assert msg in describe_validation(list(e.value.errors()))[0]


def test_grpc_request_carries_chunks(front):
    from pdserve.router.grpc_service import request_body
    from pdserve.router.proto import pdserve_pb2 as pb

    req = pb.GenerateRequest(prompt=f"Docs: {DOC_A} Q?", chunks=[DOC_A], recompute_ratio=0.5)
    job = front.completion_job(request_body(req))
    (s, e), = job.chunks.spans
    assert front.tok.decode(job.prompt_ids[s:e]) == DOC_A and job.chunks.recompute_ratio == 0.5
    ids = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                             chunk_ids=[pb.TokenIds(ids=[6, 7])])
    assert front.completion_job(request_body(ids)).chunks.spans == ((1, 3),)
    assert request_body(pb.GenerateRequest(prompt="x")).pdserve is None
