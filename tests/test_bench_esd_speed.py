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


@pytest.mark.parametrize("variant", ["reference", "prefetch=2", "prefetch=1,look=2"])
def test_a_row_counts_every_unet_call_of_the_timed_run(variant, capsys):
    """calls per step: the reference's guided calls, its two frozen calls at x_t and its trained copy's
    pass; ours, one guided call per DDIM step of the batch's longest trajectory and the trained passes."""
    import argparse
    import json

    mod = load()
    steps, ddim = 2, 3
    args = argparse.Namespace(threads=1, variant=variant, model="world", sd15_size=512, device="cpu", concept="star",
                              ddim_steps=ddim, lr=1e-5, warmup=1, batch_warmup=True, steps=steps)
    mod.child(args)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    till = mod.stops(0, steps, ddim)
    # prefetch=1,look=2: the two steps' trajectories regrouped into batches of one, each as long as its own stop
    expected = {"reference": sum(till) + 3 * steps, "prefetch=2": max(till) + 1 + steps,
                "prefetch=1,look=2": sum(till) + 2 + steps}[variant] / steps
    assert row["calls_per_step"] == expected
