"""Protobuf <-> frozen dataclasses for the worker API. The rest of the code never sees a
protobuf object. Everything decoded from a peer is validated here, with bounded sizes; a
problem raises ValueError with a message naming the field (servers map it to
INVALID_ARGUMENT)."""

from __future__ import annotations

from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import FinishReason, Request, SamplingParams, TokenLogprob

MAX_PROMPT_TOKENS = 1 << 20
MAX_REQUEST_ID_CHARS = 256
_TOKEN_ID_LIMIT = 1 << 31

FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
PB_TO_FINISH = {v: k for k, v in FINISH_TO_PB.items()}


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )
    if p.top_k is not None:
        msg.top_k = p.top_k
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    if len(msg.stop_token_ids) > 1024:
        raise ValueError("sampling.stop_token_ids: at most 1024 entries")
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def request_to_proto(r: Request) -> pb.Request:
    return pb.Request(
        request_id=r.request_id,
        prompt_token_ids=list(r.prompt_token_ids),
        sampling=sampling_to_proto(r.sampling),
        cache_salt=r.cache_salt or "",
    )


def request_from_proto(msg: pb.Request) -> Request:
    if not msg.request_id or len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request.request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
    if not msg.HasField("sampling"):
        raise ValueError("request.sampling is required")
    if not 0 < len(msg.prompt_token_ids) <= MAX_PROMPT_TOKENS:
        raise ValueError(f"request.prompt_token_ids must have 1 to {MAX_PROMPT_TOKENS} tokens")
    prompt = tuple(msg.prompt_token_ids)
    if min(prompt) < 0 or max(prompt) >= _TOKEN_ID_LIMIT:
        raise ValueError("request.prompt_token_ids holds an out-of-range token id")
    if len(msg.cache_salt) > 256:
        raise ValueError("request.cache_salt is too long")
    return Request(msg.request_id, prompt, sampling_from_proto(msg.sampling), msg.cache_salt or None)


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=[t for t, _ in lp.top],
        top_logprobs=[v for _, v in lp.top],
    )


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    if len(msg.top_token_ids) != len(msg.top_logprobs):
        raise ValueError("logprob.top_token_ids and top_logprobs differ in length")
    return TokenLogprob(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))
