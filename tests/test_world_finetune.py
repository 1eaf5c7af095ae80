"""The fine-tuning family on the trained world model (not random weights)."""

from __future__ import annotations

import pytest
from test_world_erasure import prompts_for, rate

from erasekit.cli import run
from erasekit.edits import load_edit
from erasekit.world.vocab import CONCEPTS


def test_esd_command_runs_on_the_world(tmp_path, capsys):
    """The issue's two commands, with few steps: world settings are announced and used."""
    assert run(["erase", "--method", "esd", "--concept", "star", "--set", "steps=2", "-o", str(tmp_path / "p")]) == 0
    said = capsys.readouterr().out
    assert "esd on the embedded world" in said and "lr=0.0005" in said and "ddim_steps=20" in said
    assert "steps=60" not in said.replace("ddim_steps", "")  # what --set gave is not announced as a world setting
    assert "preserve_weight=1.0" in said and "preserving the world's other shapes for 'star'" in said
    edit = load_edit(tmp_path / "p")
    cfg = edit.manifest["config"]
    assert cfg["steps"] == 2 and cfg["lr"] == 5e-4 and cfg["ddim_steps"] == 20 and len(cfg["templates"]) > 1
    # without --preserve the concept keeps the world's other shapes, as the world benchmarks pass them
    others = [v for v in CONCEPTS["shape"] if v != "star"]
    assert edit.manifest["concepts"][0]["neighbours"] == others
    assert edit.manifest["esd_preserve_prompts"] == len({" ".join(t.replace("{}", v).split()) for v in others
                                                         for t in cfg["templates"]})
    assert not (tmp_path / "p.checkpoint").exists()
    assert run(["generate", "a red star", "--patch", str(tmp_path / "p"), "-n", "2", "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    # --preserve (or a concepts file's neighbours) replaces them; a concept off the world's axes gets none
    assert run(["erase", "--method", "esd", "--concept", "star", "--preserve", "heart", "--set", "steps=1",
                "-o", str(tmp_path / "q")]) == 0
    assert "preserving the world's" not in capsys.readouterr().out
    assert load_edit(tmp_path / "q").manifest["concepts"][0] == {"target": "star", "anchor": "", "synonyms": [],
                                                                 "neighbours": [], "preserve": ["heart"]}
    # a method (or setting) that never reads keep phrases is not told it preserves anything
    for args in (["--method", "esd", "--set", "steps=1", "--set", "preserve_weight=0"], ["--method", "negative-prompt"],
                 ["--method", "sld"], ["--method", "safree"]):
        assert run(["erase", *args, "--concept", "star", "-o", str(tmp_path / args[1])]) == 0
        assert "preserving the world's" not in capsys.readouterr().out, args


@pytest.mark.slow
def test_esd_x_world_settings_erase_star_and_spare_other_shapes(world_pipe, classifier, tmp_path):
    """ESD-x with its world settings, exactly as `erasekit erase --method esd --concept star` fits it:
    star detection drops by >= 50 points, other shapes lose <= 10 points."""
    assert run(["erase", "--method", "esd", "--concept", "star", "-o", str(tmp_path / "p")]) == 0
    edit = load_edit(tmp_path / "p")
    others = [v for v in CONCEPTS["shape"] if v != "star"]
    target = prompts_for("shape", "star", 24, seed=1)
    other = {v: prompts_for("shape", v, 8, seed=2) for v in others}

    def measure():
        t = rate(world_pipe, classifier, target, "shape", "star", 1000)
        o = sum(rate(world_pipe, classifier, p, "shape", v, 2000) for v, p in other.items()) / len(others)
        return t, o

    t0, o0 = measure()
    with edit.scoped(world_pipe):
        t1, o1 = measure()
    assert t0 - t1 >= 0.50, (t0, t1)
    assert o0 - o1 <= 0.10, (o0, o1)
