"""GPU-check step 4: `tandem up` with the Triton backend on a random Llama with Llama-3-8B layer
shapes, 64 streams through the gateway with the `openai` client, and their greedy tokens
checked against the in-process engine.

`run_check(check, work)` does, in order (`run` is it with `GPU_CHECK`; a CPU test runs a tiny
`ClusterCheck` through the same code):
1. Generates the model into `work/random-llama` on the check's device (`random_llama`).
2. Builds `num_streams` prompts of fixed text from the model's tokenizer, their lengths spread
   evenly over `prompt_tokens`, and `num_warmup` others.
3. Starts `tandem up` (`up_process`): 1 prefill and 1 decode worker with the check's attention
   backend, device and dtype, embedded Redis, the gateway on a free loopback port, and every
   request disaggregated (`--local-prefill-max-tokens 0`: each prompt's KV crosses from the
   prefill worker to the decode worker). Its output goes to `work/cluster.log`.
4. Sends the warm-up prompts (Triton compiles its kernels on first use), then the load: every
   prompt at once, greedy, `max_tokens` each with `ignore_eos` (`gateway_load`).
5. Stops the cluster, in a `finally`: every process by pid, each bounded.
6. Runs the same prompts through `tandem.engine.Engine` in this process with the workers'
   engine options, all at once (the load's concurrency), greedy, with the top logprobs.
7. Compares the streamed token ids with the engine's (`agreement`). A failed stream, a token
   disagreement, or a process that did not stop on SIGTERM raises `StepFailed` with the tables.

The criterion. On a GPU the engine is not batch-invariant: cuBLAS picks its GEMM kernels by the
number of tokens in a step, the Triton decode kernel splits the context by the number of
sequences and the longest block table (`choose_num_splits`), and a step that mixes prompts and
decoding runs the prefill kernel for both; so a token's logits depend, in their last bf16 bits,
on what shares its steps, and the cluster's steps (prompts on one worker, decoding on another,
requests arriving over time) are never the reference's. So a request agrees when its tokens are the
engine's, or are up to a first position where the engine itself was at a near tie: the
cluster's token is among the engine's top `TOP_LOGPROBS` there, less than `near_tie_nats`
below the engine's token. After such a divergence the two continue from different contexts and
are not compared further. Anything else is a mismatch. With `near_tie_nats=0` (the CPU test,
float32) only identical tokens agree.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.engine.outputs import GenerationOutput
from tandem.loadtest.gpu.agreement import TOP_LOGPROBS, Kind, Verdict, compare
from tandem.loadtest.gpu.gateway_load import LoadResult, run_load
from tandem.loadtest.gpu.random_llama import LLAMA3_8B_4_LAYERS, LlamaShape, write_random_llama
from tandem.loadtest.gpu.report import Table
from tandem.loadtest.gpu.steps import Skip, StepFailed
from tandem.loadtest.gpu.up_process import ProcessExit, UpProcess

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the cluster step serves its model on a GPU"
MODEL_DIR_NAME = "random-llama"
LOG_NAME = "cluster.log"
MiB = 1024 * 1024
WARMUP_MAX_TOKENS = 4
STOP_TIMEOUT_S = 30.0
LOAD_HEADERS = (
    "requests",
    "errors",
    "output tokens",
    "duration s",
    "output tok/s",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p90 ms",
    "ITL p99 ms",
)
AGREEMENT_HEADERS = ("requests", *(kind.value for kind in Kind), "equal tokens")
# The words of the prompts: the text is fixed, the order comes from a seeded RNG.
_TEXT = (
    "the gateway sends every request to a prefill worker and a decode worker while the quick "
    "brown fox jumps over the lazy dog and the old clockmaker winds every clock on the wall "
    "blocks of keys and values travel between workers; tokens stream back to the client"
)


@dataclass(frozen=True)
class ClusterCheck:
    """What the step runs. Times are seconds: `start_timeout_s` bounds `tandem up`'s start,
    `stream_timeout_s` each stream. `prompt_tokens` is (shortest, longest)."""

    device: str
    attention_backend: str
    dtype: str
    shape: LlamaShape
    num_streams: int
    prompt_tokens: tuple[int, int]
    max_tokens: int
    kv_cache_mib: int
    near_tie_nats: float
    num_warmup: int
    start_timeout_s: float
    stream_timeout_s: float
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.prompt_tokens
        if not 2 <= low <= high:
            raise ValueError(f"prompt_tokens must be (low, high) with 2 <= low <= high, got {self.prompt_tokens}")
        if self.num_streams < 1 or self.max_tokens < 1 or self.num_warmup < 0:
            raise ValueError("num_streams and max_tokens must be >= 1 and num_warmup >= 0")
        if self.near_tie_nats < 0:
            raise ValueError(f"near_tie_nats must be >= 0, got {self.near_tie_nats}")


# The GPU check's run. Near ties: this model's logits are ~N(0, 1) over 512 ids, so its top
# logits lie in [2, 4), where one bf16 step is 2**-6 nats; 0.125 is eight of them. (Measured on
# a CPU in bf16, a 4-layer random Llama of this recipe: the same 16 prompts run batched and one
# by one differ by at most 0.016 nats in their logprobs, and the one request that diverged did
# so at a gap of less than 0.125.) The warm-up sends as many prompts as the load, so that the
# Triton kernels' variants for a full batch are compiled before the load's timings start.
GPU_CHECK = ClusterCheck(
    device="cuda",
    attention_backend="triton",
    dtype="bfloat16",
    shape=LLAMA3_8B_4_LAYERS,
    num_streams=64,
    prompt_tokens=(128, 512),
    max_tokens=128,
    kv_cache_mib=2048,
    near_tie_nats=0.125,
    num_warmup=64,
    start_timeout_s=75.0,
    stream_timeout_s=60.0,
)


def run(work: Path) -> list[Table]:
    """The GPU check's step (`steps.STEPS`): `run_check(GPU_CHECK, work)`; skips without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise Skip(NO_CUDA)
    return run_check(GPU_CHECK, work)


def build_prompts(model_dir: Path, count: int, prompt_tokens: tuple[int, int], seed: int) -> list[list[int]]:
    """`count` prompts of words of `_TEXT` (seeded order) tokenized with the model's tokenizer
    (BOS first), cut to lengths spread evenly over `prompt_tokens`."""
    from tandem.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    vocabulary = _TEXT.split()
    low, high = prompt_tokens
    prompts = []
    for i in range(count):
        length = low + (high - low) * i // max(1, count - 1)
        words = [f"Request {i}:"] + [rng.choice(vocabulary) for _ in range(length)]  # >= 1 token a word
        prompts.append(tokenizer.encode(" ".join(words))[:length])
    return prompts


def up_flags(check: ClusterCheck, model_dir: Path) -> list[str]:
    """`tandem up`'s command line (after `up`) for the check."""
    return [
        *("--prefill", "1", "--decode", "1", "--model", str(model_dir)),
        *("--attention-backend", check.attention_backend, "--device", check.device, "--dtype", check.dtype),
        *("--kv-cache-mib", str(check.kv_cache_mib), "--local-prefill-max-tokens", "0"),
        *("--host", "127.0.0.1", "--port", "0", "--ready-timeout-s", str(check.start_timeout_s)),
        *("--drain-timeout-s", "10"),
    ]


def run_check(check: ClusterCheck, work: Path) -> list[Table]:
    """Steps 1 to 7 of the module docstring; returns the tables or raises `StepFailed`."""
    stages: list[tuple[str, float]] = []
    clock = time.monotonic()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        stages.append((name, now - clock))
        clock = now

    model_dir = write_random_llama(work / MODEL_DIR_NAME, check.shape, check.dtype, check.device, check.seed)
    _release_device_memory(check.device)
    stage("generate the model")
    prompts = build_prompts(model_dir, check.num_streams, check.prompt_tokens, check.seed)
    warmup = build_prompts(model_dir, check.num_warmup, check.prompt_tokens, check.seed + 1)
    with (work / LOG_NAME).open("w") as log:
        up = UpProcess.start(up_flags(check, model_dir), work / "cache", log, check.start_timeout_s + 15.0)
        try:
            stage("start tandem up")
            if warmup:
                _require_ok(run_load(up.endpoint, model_dir.name, warmup, WARMUP_MAX_TOKENS, check.stream_timeout_s))
            stage("warm up")
            load = run_load(up.endpoint, model_dir.name, prompts, check.max_tokens, check.stream_timeout_s)
            stage("load")
        finally:
            exits = up.stop(STOP_TIMEOUT_S)
            stage("stop tandem up")
    reference = _reference(check, model_dir, prompts)
    stage("in-process engine")
    verdicts = compare([s.token_ids for s in load.streams], reference, check.near_tie_nats)
    tables = [
        _load_table(check, load),
        _agreement_table(verdicts, check.near_tie_nats),
        Table("stages", ("stage", "seconds"), tuple((name, f"{s:.1f}") for name, s in stages)),
        Table(
            "cluster processes", ("process", "pid", "after stop"), tuple((e.name, str(e.pid), e.outcome) for e in exits)
        ),
    ]
    found = problems(load, verdicts, exits)
    if found:
        raise StepFailed("; ".join(found), tables)
    return tables


def _release_device_memory(device: str) -> None:
    """Give the generator's cached blocks back to the driver, for the workers."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _require_ok(result: LoadResult) -> None:
    failed = [s.record for s in result.streams if not s.record.ok]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{len(failed)} warm-up stream(s) failed; {first.request_id}: {first.error_message}")


def _reference(check: ClusterCheck, model_dir: Path, prompts: list[list[int]]) -> list[GenerationOutput]:
    """The engine in this process, with the workers' options, on every prompt at once."""
    from tandem.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(
        model_dir,
        attention_backend=check.attention_backend,
        device=check.device,
        dtype=check.dtype,
        kv_cache_bytes=check.kv_cache_mib * MiB,
    )
    sampling = SamplingParams(max_tokens=check.max_tokens, temperature=0.0, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = engine.generate(prompts, sampling)
    engine.check_integrity()
    return outputs


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _load_table(check: ClusterCheck, load: LoadResult) -> Table:
    summary = load.summary()
    shape = check.shape
    low, high = check.prompt_tokens
    errors = ", ".join(f"{kind.value} {count}" for kind, count in summary.errors_by_kind) or "none"
    return Table(
        f"{check.num_streams} concurrent streams through the gateway (openai client)",
        LOAD_HEADERS,
        (
            (
                str(summary.num_requests),
                str(summary.num_errors),
                str(summary.output_tokens),
                f"{summary.duration_s:.2f}",
                f"{summary.output_throughput_tps:.0f}",
                *(_ms(v) for v in (summary.ttft.p50_ms, summary.ttft.p90_ms, summary.ttft.p99_ms)),
                *(_ms(v) for v in (summary.itl.p50_ms, summary.itl.p90_ms, summary.itl.p99_ms)),
            ),
        ),
        notes=(
            f"model: random Llama, {shape.num_layers} layers, hidden {shape.hidden_size}, MLP "
            f"{shape.intermediate_size}, {shape.num_heads} heads / {shape.num_kv_heads} KV heads of "
            f"{shape.head_dim}, {check.dtype}; {check.attention_backend} attention on {check.device}",
            f"tandem up: 1 prefill + 1 decode worker, every request disaggregated; prompts of {low} to "
            f"{high} tokens, greedy, {check.max_tokens} tokens each (ignore_eos), all sent at once",
            f"errors: {errors}; ITL is per streamed chunk (a chunk may carry several tokens)",
        ),
    )


def _agreement_table(verdicts: list[Verdict], near_tie_nats: float) -> Table:
    counts = {kind: sum(1 for v in verdicts if v.kind is kind) for kind in Kind}
    notes = [
        f"a near tie: the cluster's token is in the engine's top {TOP_LOGPROBS}, less than "
        f"{near_tie_nats} nats below the engine's token (0: only identical tokens agree)"
    ]
    notes += [v.detail for v in verdicts if v.kind is not Kind.IDENTICAL][:3]
    row = (
        str(len(verdicts)),
        *(str(counts[kind]) for kind in Kind),
        str(sum(v.num_equal for v in verdicts)),
    )
    return Table("greedy tokens against the in-process engine", AGREEMENT_HEADERS, (row,), tuple(notes))


def problems(load: LoadResult, verdicts: list[Verdict], exits: list[ProcessExit]) -> list[str]:
    """Why the step fails (empty: it passes): failed streams, requests that disagree with the
    engine (the first one's detail), processes that did not stop on SIGTERM."""
    found = []
    failed = [s.record for s in load.streams if not s.record.ok]
    if failed:
        first = failed[0]
        found.append(f"{len(failed)} of {len(load.streams)} streams failed; {first.request_id}: {first.error_message}")
    mismatched = [v for v in verdicts if v.kind is Kind.MISMATCH]
    if mismatched:
        found.append(f"{len(mismatched)} of {len(verdicts)} requests disagree with the engine; {mismatched[0].detail}")
    unclean = [e for e in exits if e.outcome not in ("exit code 0", "stopped")]
    if unclean:
        found.append(
            "not every process stopped on SIGTERM: " + ", ".join(f"{e.name} (pid {e.pid}) {e.outcome}" for e in unclean)
        )
    return found
