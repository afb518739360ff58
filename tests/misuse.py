"""Concurrency misuse patterns, run many times in a fresh process (a crash there is a failed
run, not a dead test session): python tests/misuse.py --runs 100 prints one JSON line per
pattern with the runs, the ConcurrencyErrors seen and the invariants checked.

Each pattern races two threads on ONE sequence of a KVCache — what the rules forbid — and
checks that kvloom answered with kvloom.ConcurrencyError (or, for structural operations that
wait, with a consistent result), and that the cache is intact afterwards: every head of a
layer holds the same tokens, every append is either wholly there or wholly absent.
"""
import argparse
import json
import sys
import threading

import torch

import kvloom

L, H, D, N = 2, 3, 64, 128  # layers, kv heads, head dim, tokens per append (long enough to overlap)


def payload(tag: int):
    """k, v for one append: every element of k is the append's tag (recognisable later)."""
    k = torch.full((H, N, D), float(tag))
    return k, k.clone()


def race(a, b, iters):
    """Runs a(i) and b(i) for i < iters on two threads started together; counts the
    ConcurrencyErrors each side saw; re-raises anything else."""
    bar = threading.Barrier(2)
    hits = [0, 0]
    errs = []

    def run(fn, side):
        bar.wait()
        for i in range(iters):
            try:
                fn(i)
            except kvloom.ConcurrencyError:
                hits[side] += 1
            except Exception as e:  # noqa: BLE001 - reported to the caller
                errs.append(e)
                return

    ts = [threading.Thread(target=run, args=(a, 0)), threading.Thread(target=run, args=(b, 1))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]
    return hits


def check_heads_agree(cache, seq, tags_done=None):
    """Every head of a layer holds the same tokens; with tags_done, the tags present in layer 0
    are exactly the successful appends, each whole (N rows) and in one piece."""
    for layer in range(L):
        ref = None
        for h in range(H):
            k, _, ords, _ = cache.gather(layer, h, seq)
            if ref is None:
                ref = (k, ords)
            else:
                assert torch.equal(k, ref[0]) and torch.equal(ords, ref[1]), f"heads of layer {layer} differ"
    if tags_done is not None:
        k = cache.gather(0, 0, seq)[0][:, 0]
        tags = k.view(-1, N)
        assert bool((tags == tags[:, :1]).all()), "an append was torn"
        assert sorted(tags[:, 0].long().tolist()) == sorted(tags_done), "appends lost or duplicated"


def new_cache(policy=None):
    cache = kvloom.KVCache(L, H, D, block_size=16, policy=policy, capacity_bytes=1 << 30)
    return cache, cache.add_sequence()


def append_append(iters):
    cache, s = new_cache()
    done, lock = [], threading.Lock()

    def side(base):
        def f(i):
            tag = base + i
            cache.append(0, s, *payload(tag))
            with lock:
                done.append(tag)
        return f

    hits = race(side(1), side(100001), iters)
    check_heads_agree(cache, s, done)
    assert cache.seq_length(s) == N * len(done)
    return sum(hits)


def append_attend(iters):
    cache, s = new_cache()
    cache.append(0, s, *payload(0))
    done = [0]
    q = torch.randn(1, 6, D)

    def app(i):
        cache.append(0, s, *payload(i + 1))
        done.append(i + 1)

    def att(i):
        out = cache.attend(0, q, [s])
        assert torch.isfinite(out).all()

    hits = race(app, att, iters)
    check_heads_agree(cache, s, done)
    return sum(hits)


def fork_append(iters):
    cache, s = new_cache()
    forks = []

    def app(i):
        for layer in range(L):
            cache.append(layer, s, *payload(i))

    hits = race(app, lambda i: forks.append(cache.fork(s)), iters)
    for f in forks + [s]:
        check_heads_agree(cache, f)
        for layer in range(L):  # a fork sees an append wholly or not at all
            assert cache.length(layer, 0, f) % N == 0
    return sum(hits)


def drop_attend(iters):
    cache, s = new_cache()
    cache.append(0, s, *payload(1))
    q = torch.randn(1, 6, D)
    gone = []

    def att(i):
        try:
            cache.attend(0, q, [s])
        except (IndexError, ValueError) as e:  # after the drop: a clean error naming the sequence
            assert "sequence" in str(e), e
            gone.append(i)

    def drop(i):
        if i == iters // 2:
            cache.drop(s)

    hits = race(att, drop, iters)
    assert s not in cache.sequences() and cache.memory_bytes() == 0
    return sum(hits)


def rollback_append(iters):
    cache, s = new_cache()

    def app(i):
        cache.append(0, s, *payload(i + 1))

    def back(i):
        if cache.seq_length(s) >= N:
            cache.rollback(s, N)  # appends are N tokens each: one whole append goes

    hits = race(app, back, iters)
    check_heads_agree(cache, s)
    k = cache.gather(0, 0, s)[0][:, 0].view(-1, N)
    assert bool((k == k[:, :1]).all()), "an append was torn by a rollback"
    return sum(hits)


def policy_attend(iters):
    cache, s = new_cache(kvloom.Window(2, 40))
    cache.append(0, s, *payload(0))  # under load every racing append may collide: start non-empty
    q = torch.randn(1, 6, D)

    def app(i):
        cache.append(0, s, *payload(i + 1))
        cache.apply_policy(0, s)

    def att(i):
        assert torch.isfinite(cache.attend(0, q, [s])).all()

    hits = race(app, att, iters)
    check_heads_agree(cache, s)
    cache.apply_policy(0, s)  # the last one may have collided (and done nothing)
    assert cache.length(0, 0, s) == 42
    return sum(hits)


def evict_gather(iters):
    cache, s = new_cache()
    cache.append(0, s, *payload(1))
    cache.append(0, s, *payload(2))

    def ev(i):
        live = cache.slots(0, 0, s)[0]
        if len(live) > 1:
            cache.evict(0, 0, s, [int(live[0])])

    def ga(i):
        k, v, ords, _ = cache.gather(0, 0, s)
        assert k.shape[0] == ords.shape[0]

    hits = race(ev, ga, iters)
    assert cache.length(0, 0, s) >= 1
    return sum(hits)


PATTERNS = {f.__name__: f for f in (append_append, append_attend, fork_append, drop_attend, rollback_append,
                                    policy_attend, evict_gather)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--only", default=None)
    args = p.parse_args(argv)
    kvloom.set_num_threads(1)
    for name, fn in PATTERNS.items():
        if args.only and name != args.only:
            continue
        hits = 0
        for _ in range(args.runs):
            hits += fn(args.iters)
        print(json.dumps({"pattern": name, "runs": args.runs, "concurrency_errors": hits}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
