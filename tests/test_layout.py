"""The package's shape: the core API works without transformers; every benchmark is a module
of the one harness and a `kvloom bench` sub-command; old public names still resolve."""
import subprocess
import sys
import textwrap

import pytest

import kvloom


def test_core_api_without_transformers():
    code = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is blocked in this test")

        sys.meta_path.insert(0, Block())
        import torch
        import kvloom
        from kvloom import policies
        for name in policies.names():
            policies.get(name).example()  # every policy's config builds without transformers
        cache = kvloom.KVCache(2, 2, 16, policy=kvloom.Window(2, 8))
        s = cache.add_sequence()
        cache.append(0, s, torch.randn(2, 20, 16), torch.randn(2, 20, 16))
        cache.apply_policy(0, s)
        assert cache.lengths(s)[0] == [10, 10]
        out = kvloom.ops.decode_attention(torch.randn(1, 4, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16))
        assert out.shape == (1, 4, 16)
        import kvloom.hf.arch, kvloom.hf.compat  # the adapter's pure parts import without it too
        assert "transformers" not in sys.modules
        try:
            kvloom.Cache
        except ImportError as e:
            assert "transformers" in str(e)
        else:
            raise AssertionError("kvloom.Cache needs transformers")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_every_benchmark_is_a_harness_module_and_a_cli_command(capsys):
    from kvloom import bench, cli
    from kvloom.bench.harness import Benchmark

    reg = bench.registry()
    assert {"attention", "stats", "e2e", "fidelity", "sidepath", "hogwild", "sharing", "nats"} <= set(reg)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for name, b in reg.items():
        assert isinstance(b, Benchmark) and b.name == name and b.help and name in text
        assert type(b).markdown is not Benchmark.markdown and type(b).run is not Benchmark.run


def test_public_names_keep_working():
    for name in ("Cache", "enable", "Conversation", "ciflex", "hogwild", "convert", "nats", "NAtS", "FastGen",
                 "TaskKV", "HeavyHitter", "Window", "Full", "KVCache", "BlockPool", "ops", "reference", "models"):
        assert getattr(kvloom, name) is not None
    assert kvloom.nats.Scorer is kvloom.policies.nats.Scorer
    assert kvloom.hogwild.generate and kvloom.convert.to_cla and kvloom.ciflex.Selector


def test_cuda_without_a_gpu_is_a_clear_error_and_the_wheel_imports():
    import torch

    assert isinstance(kvloom._core.cuda_built, bool)
    assert kvloom._core.cuda_device_count() >= 0
    if torch.cuda.is_available() and kvloom._core.cuda_built:
        pytest.skip("this machine has a GPU: tests/test_cuda.py covers it")
    with pytest.raises(ValueError, match="CUDA"):
        kvloom.KVCache(1, 1, 8, device="cuda")
    with pytest.raises(ValueError, match="CPU or a CUDA device"):
        kvloom.KVCache(1, 1, 8, device="mps")
    with pytest.raises((ValueError, TypeError), match="device"):
        kvloom.BlockPool("float32", 8, 4, 16, 0, "cuda", 0)
