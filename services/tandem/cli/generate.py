"""`tandem generate`: prompts through an in-process engine, completions printed."""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.cli.inputs import model_dir
from tandem.common.options import add_flags, from_args


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.engine.config import EngineConfig

    parser.add_argument("--model", type=Path, default=None, help="local HF model directory (default: tiny model)")
    add_flags(parser, EngineConfig)
    parser.add_argument("prompts", nargs="+")
    # The request's sampling parameters: what this command asks, not a service's config.
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from tandem.engine import Engine, EngineConfig, SamplingParams
    from tandem.engine.tokenizer import Tokenizer

    directory = model_dir(args.model)
    tokenizer = Tokenizer.from_pretrained(directory)
    engine = Engine(directory, from_args(EngineConfig, args))
    if args.chat:
        prompts = [
            tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in args.prompts
        ]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompts]
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    for text, out in zip(args.prompts, engine.generate(prompts, params)):
        print(f"prompt: {text!r}")
        completion = tokenizer.decode(list(out.token_ids))
        print(f"completion: {completion!r}  [{len(out.token_ids)} tokens, {out.finish_reason.value}]")
    return 0
