"""KV transfer between processes (issue 18): three real processes on torch.distributed (gloo),
one thread each. Rank 0 prefills and sends; rank 1 receives, continues decoding exactly as if
the sequence had never moved (every setting in dist_worker.SETTINGS), adds sequences to a cache
that holds others, and meets a corrupted, truncated, foreign, timed-out and dead sender with a
clear error that changes nothing."""
import json
import sys
from pathlib import Path

import pytest
import torch

import kvloom
from kvloom import distributed as kd
from kvloom.bench.distributed import launch  # ranks through the environment, as torchrun does

HERE = Path(__file__).parent


@pytest.mark.hf
@pytest.mark.slow
def test_transfer_between_processes(tmp_path):
    from hf_helpers import tiny_model
    sys.path.insert(0, str(HERE))
    from dist_worker import SETTINGS

    tiny_model("llama").save_pretrained(tmp_path / "model")
    launch([str(HERE / "dist_worker.py"), str(tmp_path / "model"), str(tmp_path)], 3, timeout=300)
    r = json.loads((tmp_path / "rank1.json").read_text())
    for name in SETTINGS:
        got = r[name]
        assert got["first"][0] == got["first"][1], name
        assert got["tokens"] == got["here"] and got["same_logits"], name  # as if it had never moved
        assert got["bytes"][0] == got["bytes"][1], name  # the receiver holds what the sender held
        # on the wire: the cache's bytes, a few bytes of metadata per slot and a small header
        assert got["bytes"][1] < got["wire"] < 1.1 * got["bytes"][1] + 8192, name
    for name in ("window", "window_int4", "h2o_budget"):  # compressed: less than the full KV on the wire
        assert r[name]["wire"] < 0.75 * r["full"]["wire"], name
    assert r["window_int4"]["wire"] < r["window"]["wire"]
    assert r["readme"][0] == r["readme"][1] and len(r["readme"][0]) == 48  # the README's prefill/generate flow
    kv = r["kvcache"]
    assert kv["same"] and kv["mine"] and kv["blocks"][0] == kv["blocks"][1]  # forks still share their blocks
    e = r["errors"]
    assert e[0].startswith("SnapshotError") and "checksum" in e[0]
    assert e[1].startswith("SnapshotError") and "checksum" in e[1]
    assert e[2].startswith("TransferError") and "not a kvloom transfer" in e[2]
    assert e[3].startswith("TransferError") and "newer kvloom" in e[3]
    assert e[4].startswith("TransferError") and "'cache'" in e[4]
    assert e[5].startswith("TransferError") and "-5 bytes" in e[5]
    assert r["after_errors"] and r["good_after_errors"]
    assert r["timeout"].startswith("TransferError") and "rank 2" in r["timeout"] and "Timed out" in r["timeout"]
    assert r["died"].startswith("TransferError") and "rank 0" in r["died"] and "no payload" in r["died"]
    assert r["intact"]


def test_misuse_is_refused_without_a_process_group():
    cache = kvloom.KVCache(1, 1, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.send_sequences(cache, [], 1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.total_memory_bytes(cache)
    with pytest.raises(TypeError, match="send_cache"):
        kd.send_sequences(object(), [], 1)
    with pytest.raises(TypeError, match="KVCache"):
        kd.recv_sequences(object(), 0)


def test_dumps_loads_round_trip():
    cache = kvloom.KVCache(2, 2, 8, block_size=4, policy=kvloom.Window(1, 3))
    s = cache.add_sequence()
    for layer in range(2):
        cache.append(layer, s, torch.randn(2, 9, 8), torch.randn(2, 9, 8))
        cache.apply_policy(layer, s)
    data = cache.dumps()
    back = kvloom.KVCache.loads(data)
    assert back.sequences() == [s] and back.memory_bytes() == cache.memory_bytes()
    for layer in range(2):
        for h in range(2):
            for x, y in zip(cache.gather(layer, h, s), back.gather(layer, h, s)):
                assert torch.equal(x, y)
    other = kvloom.KVCache(2, 2, 8, block_size=4)
    keep = other.add_sequence()
    other.append(0, keep, torch.ones(2, 2, 8), torch.ones(2, 2, 8))
    new = other.restore_bytes(data)
    assert len(new) == 1 and other.seq_length(keep) == 2 and other.memory_bytes() > 0
    bad = bytearray(data)
    bad[-40] ^= 1
    before = other.memory_bytes()
    with pytest.raises(kvloom.SnapshotError, match="checksum"):
        other.restore_bytes(bytes(bad))
    with pytest.raises(kvloom.SnapshotError, match="checksum"):
        kvloom.KVCache.loads(bytes(bad))
    assert other.memory_bytes() == before
