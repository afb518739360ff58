"""Every registered policy through the shared policy suite (tests/policy_suite.py), plus the
registry itself: names, parameter schemas, validation, make_policy and the CLI flags."""
import pytest
from hypothesis import given, settings, strategies as st

import kvloom
from kvloom import policies

import policy_suite

NAMES = policies.names()


def test_registry_has_the_builtins_in_order():
    assert NAMES[:6] == ["full", "window", "h2o", "fastgen", "taskkv", "nats"]
    for name in NAMES:
        cls = policies.get(name)
        assert cls.name == name and cls.__doc__
        assert kvloom.make_policy(name).__class__ is cls
        for p in cls.params():
            assert p.help, f"{name}.{p.name} needs a help text (the CLI shows it)"
    assert policies.get("heavy_hitter") is policies.get("H2O") is kvloom.HeavyHitter


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12)
@given(seed=st.integers(0, 10_000))
def test_policy_on_the_cpp_cache(name, seed):
    policy_suite.check_kvcache(policies.get(name).example(), seed)


@pytest.mark.hf
@pytest.mark.parametrize("name", NAMES)
def test_policy_through_transformers(name):
    policy_suite.check_hf(policies.get(name))


def test_parameters_are_validated_from_the_schema():
    with pytest.raises(ValueError, match="recent must be in"):
        kvloom.Window(recent=0)
    with pytest.raises(ValueError, match="must be an integer"):
        kvloom.Window(recent=2.5)
    with pytest.raises(ValueError, match="ratio must be in"):
        kvloom.HeavyHitter(ratio=1.5)
    with pytest.raises(ValueError, match="finite"):
        kvloom.FastGen(recovery=float("nan"))
    with pytest.raises(ValueError, match="no parameter 'recnet'"):
        policies.make("window", recnet=8)
    with pytest.raises(ValueError, match="unknown policy"):
        kvloom.make_policy("windw")
    with pytest.raises(TypeError, match="policy"):
        kvloom.make_policy(3)
    assert kvloom.Window(4, 96) == kvloom.Window(sinks=4, recent=96) and repr(kvloom.Window(4, 96)) == \
        "window(sinks=4, recent=96)"


def test_cli_flags_come_from_the_registry(capsys):
    from kvloom import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--help"])
    text = capsys.readouterr().out
    for name in NAMES:
        for p in policies.get(name).params():
            assert "--" + p.name.replace("_", "-") in text
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "x", "--policy", "window", "--ratio", "0.2"])
    assert e.value.code == 2 and "--ratio: not a parameter of --policy window" in capsys.readouterr().err
