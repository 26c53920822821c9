"""Compiling a `StructuredOutput` into an xgrammar `CompiledGrammar`, off the step loop.

Who calls it: the engine (`Engine.add_request` / `reserve`) and, before that, the worker's
RPC handlers (so that a bad grammar is INVALID_ARGUMENT before anything is queued). `submit`
is thread-safe and returns at once with a future; a thread pool compiles, and the futures
are cached (least recently used first out) under a hash of (kind, spec), so a schema is
compiled once per worker. A compile error fails only that future, with a `GrammarError`
naming the problem; the step loop never waits for a compile.

What each kind compiles to (all JSON compact: no whitespace between tokens, "," and ":"):
- json_schema: xgrammar's strict conversion (no properties beyond the schema's), then one
  repair: strings with a length bound or a format are `[^"\\\r\n]{m,n}`, which lets raw
  control characters (U+0000-U+001F) through, and those are invalid in a JSON string; they
  become `[^\0-\x1f"\\]`, as xgrammar's unbounded strings already are. And every JSON string
  character class also excludes U+D800-U+DFFF: xgrammar decodes UTF-8 arithmetically and
  accepts an encoded surrogate (bytes ED A0-BF xx, which byte-level vocabularies can emit one
  byte per token), which is not UTF-8 at all and decodes to three U+FFFD.
- json_object: any JSON object (xgrammar's JSON grammar without its free whitespace).
- regex: the regex; choice: an alternation of the choices as literal strings (vLLM's
  `choice`); grammar: the EBNF grammar as xgrammar parses it (a `root` rule).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xgrammar as xgr

from tandem.common.request import StructuredOutput
from tandem.engine.grammar.vocab import tokenizer_info

JSON_SEPARATORS = (",", ":")
# A length-bounded JSON string character as xgrammar writes it, and its repair (module doc).
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
# The start of every JSON string character class xgrammar writes, and the same with surrogates out.
_STRING_CLASS_START = r"[^\0-\x1f\"\\"
_NO_SURROGATES_START = r"[^\0-\x1f\"\\\uD800-\uDFFF"
# xgrammar prefixes its messages with "[time] /path/file.cc:line: " (and sometimes a check).
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class GrammarError(ValueError):
    """A structured output spec that cannot be compiled; the message names the problem."""


def grammar_key(so: StructuredOutput) -> str:
    """The cache key: a stable hash of (kind, spec)."""
    return hashlib.blake2b(f"{so.kind}\0{so.spec}".encode(), digest_size=16).hexdigest()


def json_schema_ebnf(schema: str) -> str:
    """The EBNF of a JSON schema: strict, compact, strings free of control characters."""
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS)
    return _json_strings(str(grammar))


def _json_strings(ebnf: str) -> str:
    """The repairs of the module doc: no control characters, no encoded surrogates."""
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR).replace(_STRING_CLASS_START, _NO_SURROGATES_START)


def choice_ebnf(spec: str) -> str:
    """`root ::= "a" | "b"`: each choice a JSON-escaped literal (xgrammar's string escapes)."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"choice must be a JSON list of strings: {exc}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choice must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _compile_json_schema(compiler: xgr.GrammarCompiler, spec: str) -> xgr.CompiledGrammar:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    return compiler.compile_grammar(json_schema_ebnf(spec))


def _compile_json_object(compiler: xgr.GrammarCompiler, spec: str) -> xgr.CompiledGrammar:
    """Any JSON object: a schema with no constraint but the type (not strict)."""
    grammar = xgr.Grammar.from_json_schema(
        '{"type": "object"}', any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=False
    )
    return compiler.compile_grammar(_json_strings(str(grammar)))


_COMPILERS: dict[str, Callable[[xgr.GrammarCompiler, str], xgr.CompiledGrammar]] = {
    "json_schema": _compile_json_schema,
    "json_object": _compile_json_object,
    "regex": lambda compiler, spec: compiler.compile_regex(spec),
    "choice": lambda compiler, spec: compiler.compile_grammar(choice_ebnf(spec)),
    "grammar": lambda compiler, spec: compiler.compile_grammar(spec),
}


class GrammarCompiler:
    """Owned by the engine; `submit` may be called from any thread (module doc)."""

    def __init__(
        self,
        model_dir: Path,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        *,
        max_workers: int = 2,
        max_cached: int = 512,
    ) -> None:
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._eos_token_ids = tuple(eos_token_ids)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._max_cached = max_cached
        self._cache: OrderedDict[str, Future[xgr.CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._init_lock = threading.Lock()  # the xgrammar compiler, built on a pool thread
        self._compiler: xgr.GrammarCompiler | None = None  # built by the first compile

    def submit(self, so: StructuredOutput) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of `so`, from the cache or a new compile (module doc)."""
        key = grammar_key(so)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self.compile, so)
            self._cache[key] = future
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            return future

    def compile(self, so: StructuredOutput) -> xgr.CompiledGrammar:
        """Compile now, on the calling thread (the pool's, or a benchmark's). GrammarError
        names the problem."""
        compiler = self._xgrammar_compiler()
        try:
            return _COMPILERS[so.kind](compiler, so.spec)
        except GrammarError as exc:
            raise GrammarError(f"invalid structured output ({so.kind}): {exc}") from None
        except (RuntimeError, ValueError) as exc:
            message = _NATIVE_PREFIX.sub("", str(exc).strip()).strip()
            raise GrammarError(f"invalid structured output ({so.kind}): {message}") from None

    def _xgrammar_compiler(self) -> xgr.GrammarCompiler:
        with self._init_lock:
            if self._compiler is None:
                info = tokenizer_info(self._model_dir, self._vocab_size, self._eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
