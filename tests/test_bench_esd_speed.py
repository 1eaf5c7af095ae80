"""benchmarks/esd_speed.py's variant grammar: a typo fails before any run, in one line."""

import pytest
from benchmod import load_bench


def load():
    return load_bench("esd_speed")


def test_variants_parse_and_refuse_what_they_cannot_run():
    parse = load().parse_variant
    assert parse("reference") == (True, {})
    assert parse("reference,dtype=bf16") == (True, {"dtype": "bf16"})
    assert parse("prefetch=8,dtype=bf16,compile=1") == (False, {"prefetch": "8", "dtype": "bf16", "compile": "1"})
    assert parse("prefetch=8,look=8") == (False, {"prefetch": "8", "look": "8"})
    for bad, why in (("reference,prefetch=8", "unknown key"), ("prefetch=8,speed=2", "unknown key"),
                     ("prefetch=8,dtype=fp16", "dtype is one of fp32, bf16"), ("prefetch", "not KEY=VALUE"),
                     ("prefetch=8,compile=true", "compile is one of 0, 1"), ("prefetch=0", "whole number"),
                     ("prefetch=x", "whole number"), ("prefetch=8,look=0", "whole number"), ("prefetch=8,mp=bf61", "mp is one of"),
                     ("prefetch=8,prefetch=4", "given twice")):
        with pytest.raises(SystemExit, match=why):
            parse(bad)


def test_only_needs_a_reference(monkeypatch):
    mod = load()
    for variants in ("prefetch=8", "reference,cl=1 prefetch=8"):  # a channels-last reference is a variant
        monkeypatch.setattr("sys.argv", ["esd_speed.py", "--only", "--variants", variants])
        with pytest.raises(SystemExit, match="needs a reference"):
            mod.main()
