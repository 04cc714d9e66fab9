"""`phimlx generate | chat | info | convert | download | list | bench`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence

from .errors import PhimlxError

log = logging.getLogger("phimlx")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .hub import DEFAULT_MODEL

    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"a .gguf path, a preset, or a hub repo id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--filename", help="file in the hub repo (globs like '*q4*.gguf' work)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--tokenizer-repo", help="use this hub repo's tokenizer.json")
    p.add_argument("--backend", default="auto", help="auto (default), numpy or mlx")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float, default=1.1)
    p.add_argument("--repeat-last-n", type=int, default=64)
    # Candle's Phi-3 example seeds with the speed of light (m/s): the same default lets a
    # run of that example be repeated here.
    p.add_argument("--seed", type=int, default=299792458, help="random seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system message")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=args.seed,
        stop=args.stop,
    )


def _load(args: argparse.Namespace):  # noqa: ANN202
    from . import load

    return load(
        args.model,
        filename=args.filename,
        revision=args.revision,
        backend=args.backend,
        threads=args.threads,
        tokenizer_repo=args.tokenizer_repo,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    last = None
    for chunk in model.stream(prompt, chat=not args.raw, system=args.system, **_sampling(args)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None and last.stats is not None:
        print(f"[{last.finish_reason}] {last.stats.summary()} ({model.backend})", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(
        f"phimlx chat with {model.path.name} ({model.backend}); empty line or Ctrl-D ends",
        file=sys.stderr,
    )
    opts = _sampling(args)
    opts.pop("system", None)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        parts = []
        try:
            for chunk in model.stream(messages, **opts):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                parts.append(chunk.text)
        except KeyboardInterrupt:
            pass  # stop this answer, keep the conversation
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(parts)})


def cmd_info(args: argparse.Namespace) -> int:
    from .backends import choose, probe
    from .config import ModelConfig
    from .gguf import open_gguf
    from .hub import resolve_model

    path = resolve_model(args.model, filename=args.filename).path
    mf = open_gguf(path)
    md = mf.metadata
    types = Counter(t.type.name for t in mf.tensors.values())
    n_params = sum(t.n_elements for t in mf.tensors.values())
    print(f"file:          {path} ({mf.file_size / 2**30:.2f} GiB, GGUF v{mf.version})")
    print(f"name:          {md.get('general.name', '?')}")
    print(f"architecture:  {mf.architecture}")
    print(f"parameters:    {n_params / 1e9:.2f} B")
    print(f"tensor types:  {', '.join(f'{k} x{v}' for k, v in types.most_common())}")
    try:
        cfg = ModelConfig.from_gguf(mf)
        print(
            f"layers:        {cfg.n_layers}, hidden {cfg.hidden_size}, ffn {cfg.ffn_size}, "
            f"heads {cfg.n_heads}/{cfg.n_kv_heads} x {cfg.head_dim}"
        )
        print(
            f"context:       {cfg.context_length}"
            + (f" (LongRoPE from {cfg.rope_original_context})" if cfg.rope_long_factors else "")
            + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else "")
        )
        print(f"vocab:         {cfg.vocab_size}")
    except PhimlxError as e:
        print(f"config:        NOT RUNNABLE: {e}")
    tokens = md.get("tokenizer.ggml.tokens") or []
    specials = []
    for key in ("bos", "eos", "eot", "unknown", "padding"):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            specials.append(f"{key}={tokens[i]!r}({i})")
    print(
        f"tokenizer:     {md.get('tokenizer.ggml.model', 'none')}, {len(tokens)} tokens; "
        + " ".join(specials)
    )
    print(f"chat template: {'yes' if 'tokenizer.chat_template' in md else 'no'}")
    name, reason = choose(args.backend)
    print(f"backend:       {name} ({reason})")
    for b in ("numpy", "mlx"):
        why = probe(b)
        print(f"  {b:6s} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .mlx.convert import convert

    out = convert(args.gguf, args.out_dir)
    print(f"wrote {out}; load it with mlx_lm.load({str(out)!r})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download

    r = download(args.model, filename=args.filename, revision=args.revision)
    print(r.path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .hub import PRESETS, list_cached

    cached = list_cached()
    if not cached:
        print("no GGUF models in the hub cache")
    for c in cached:
        print(f"{c.repo_id}/{c.filename}  {c.size / 2**30:.2f} GiB  {c.path}")
    print("\npresets: " + ", ".join(PRESETS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phimlx", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", "-p", help="the prompt (default: read stdin)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat")
    _add_model_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="describe a model file")
    i.add_argument("model")
    i.add_argument("--filename")
    i.add_argument("--backend", default="auto")
    i.set_defaults(func=cmd_info)

    cv = sub.add_parser("convert", help="write an mlx-lm model folder from a GGUF")
    cv.add_argument("gguf")
    cv.add_argument("out_dir")
    cv.set_defaults(func=cmd_convert)

    d = sub.add_parser("download", help="fetch a model into the hub cache")
    d.add_argument("model")
    d.add_argument("--filename")
    d.add_argument("--revision")
    d.set_defaults(func=cmd_download)

    ls = sub.add_parser("list", help="list cached models and presets")
    ls.set_defaults(func=cmd_list)

    sub.add_parser("bench", help="tokens/s across backends and peers (phimlx bench --help)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phimlx`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: argparse.REMAINDER would drop its --options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except PhimlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
