"""Structured output (issue 19): grammars compiled with xgrammar, applied as token bitmasks.

`compiler.GrammarCompiler` compiles a `StructuredOutput` off the step loop (a thread pool,
cached by a hash of (kind, spec)); `matchers.GrammarMatchers` keeps one matcher per
constrained sequence, masks its logits row before sampling and advances on each token.
`waiting.GrammarWaits` holds the constrained sequences whose compile is not done yet.
`vocab.tokenizer_info` describes the worker's tokenizer to xgrammar.
"""
