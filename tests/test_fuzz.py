"""Bad input, tried as a careless user would: every invocation exits 2 with one line on stderr, no
traceback, nothing written and no existing file changed; random strings through the Python API
fail, when they fail, with an ErasekitError."""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import erasekit
from erasekit.cli import run
from erasekit.config import apply_overrides
from erasekit.errors import ErasekitError
from erasekit.evaluation import parse_seeds
from erasekit.generate import generate
from erasekit.methods import REGISTRY
from erasekit.methods.uce import UCEConfig
from tiny import tiny_sdxl

LONG = "star " * 40


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, world_pipe):
    """A working folder with the files the invocations point at (a user's folder among them)."""
    d = tmp_path_factory.mktemp("work")
    (d / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (d / "data.json").write_text(json.dumps({"kind": "weight_delta"}))
    (d / "latin1.txt").write_bytes("étoile\n".encode("latin-1"))
    (d / "bad.json").write_text(json.dumps([{"name": "star"}]))
    (d / "existing-dir").mkdir()
    (d / "existing-dir" / "mine.txt").write_text("the user's")
    edit = erasekit.erase(world_pipe, "star", method="uce")
    edit.save(d / "edit")
    erasekit.erase(world_pipe, "star", method="negative-prompt").save(d / "hook-edit")
    edit.save(d / "truncated-edit")
    data = (d / "truncated-edit" / "edit.safetensors").read_bytes()
    (d / "truncated-edit" / "edit.safetensors").write_bytes(data[: len(data) // 2])
    edit.save(d / "edited-edit")
    m = json.loads((d / "edited-edit" / "edit.json").read_text())
    m["config"]["lam"] = 9
    (d / "edited-edit" / "edit.json").write_text(json.dumps(m))
    erasekit.erase(tiny_sdxl(tmp_path_factory.mktemp("tok")), "star", method="uce").save(d / "sdxl-edit")
    from erasekit.attacks import attack
    from erasekit.attacks.report import write_attack_run
    from erasekit.attacks.textual_inversion import TextualInversion

    r = attack(world_pipe, "star", TextualInversion(steps=1, batch_size=1), patch=edit, seeds=[0], sets=("target",),
               cache=d.parent / "attack-cache")
    write_attack_run(r, d / "adv-run")
    write_attack_run(r, d / "adv-other")
    m = json.loads((d / "adv-other" / "adversarial.json").read_text())
    m["manifest"]["model_fingerprint"] = "0" * 64
    (d / "adv-other" / "adversarial.json").write_text(json.dumps(m))
    return d


def attack_setting_cases() -> list[list[str]]:
    """Per registered attack: a setting of the wrong type and, where one is bounded, an out-of-range value."""
    from erasekit.attacks import REGISTRY as ATTACKS

    out = []
    for name, cls in ATTACKS.items():
        fields = dataclasses.fields(cls.Config)
        typed = next(f for f in fields if f.type in ("int", "float", int, float))
        out.append(["attack", "-c", "star", "-a", name, "-p", "edit", "--set", f"{typed.name}=notanumber", "-o", "r"])
        bounded = next((f for f in fields if "min" in f.metadata or "above" in f.metadata), None)
        if bounded is not None:
            low = bounded.metadata.get("min", bounded.metadata.get("above"))
            out.append(["attack", "-c", "star", "-a", name, "-p", "edit", "--set", f"{bounded.name}={low - 1}",
                        "-o", "r"])
    return out


def setting_cases() -> list[list[str]]:
    """Per registered method: a value of the wrong type and, where the maths bounds one, an
    out-of-range value."""
    out = []
    for name, cls in REGISTRY.items():
        fields = dataclasses.fields(cls.Config)
        typed = next(f for f in fields if f.type in ("int", "float", "bool", int, float, bool))
        out.append(["erase", "-c", "star", "--method", name, "--set", f"{typed.name}=notanumber", "-o", "out"])
        bounded = next((f for f in fields if "min" in f.metadata or "above" in f.metadata or "choices" in f.metadata),
                       None)
        if bounded is not None:
            m = bounded.metadata
            bad = "zzz" if "choices" in m else str(m.get("min", m.get("above", 0)) - 1)
            out.append(["erase", "-c", "star", "--method", name, "--set", f"{bounded.name}={bad}", "-o", "out"])
    return out


CASES = [
    # generate
    ["generate", ""], ["generate", "   "], ["generate", "a star", "-n", "0"], ["generate", "a star", "-n", "-3"],
    ["generate", "a star", "-n", "abc"], ["generate", "a star", "--steps", "0"], ["generate", "a star", "--steps", "x"],
    ["generate", "a star", "--guidance", "nan"], ["generate", "a star", "-o", "grid.txt"],
    ["generate", "a star", "-o", "missing/dir/g.png"], ["generate", "a star", "--patch", "nope"],
    ["generate", "a star", "--patch", "pic.png"], ["generate", "a star", "--patch", "data.json"],
    ["generate", "a star", "--patch", "truncated-edit"], ["generate", "a star", "--patch", "edited-edit"],
    ["generate", "a star", "--patch", "sdxl-edit"], ["generate", "a star", "--model", "nope/dir/x"],
    ["generate", "a star", "--model", "pic.png"], ["generate", "a star", "--model", "../../../.."],
    ["generate", "a star", "--seed", "1e9x"], ["generate", LONG], ["generate", "a star", "--bogus"],
    ["generate", "a star", "--seed", "9" * 30], ["generate", "\udce9toile"], ["generate", "a star", "-o", "\udce9.png"],
    # erase
    ["erase", "-o", "out"], ["erase", "-c", "", "-o", "out"], ["erase", "-c", "   ", "-o", "out"],
    ["erase", "-c", "star"], ["erase", "-c", "star", "--method", "zzz", "-o", "out"],
    ["erase", "-c", "star", "--set", "nope=1", "-o", "out"], ["erase", "-c", "star", "--set", "lam", "-o", "out"],
    ["erase", "-c", "star", "--set", "lam=nan", "-o", "out"], ["erase", "-c", "star", "--set", "templates=", "-o", "out"],
    ["erase", "-c", "star", "--set", "templates=a photo", "-o", "out"],
    ["erase", "-c", "star", "--anchor", "star", "-o", "out"], ["erase", "-c", "star", "--preserve", "star", "-o", "out"],
    ["erase", "-c", "star", "-o", "missing/out"], ["erase", "-c", "star", "-o", "existing-dir"],
    ["erase", "-c", "star", "-o", "existing-dir", "--overwrite"], ["erase", "-c", "star", "-o", "pic.png", "--overwrite"],
    ["erase", "-c", "star", "-o", "/etc/passwd"], ["erase", "--concepts-file", "pic.png", "-o", "out"],
    ["erase", "--concepts-file", "latin1.txt", "-o", "out"], ["erase", "--concepts-file", "nope.txt", "-o", "out"],
    ["erase", "--concepts-file", "bad.json", "-o", "out"], ["erase", "-c", LONG, "-o", "out"],
    ["erase", "-c", "star", "--model", "pic.png", "-o", "out"],
    # export
    ["export", "-o", "x"], ["export", "--patch", "nope", "-o", "x"], ["export", "--patch", "data.json", "-o", "x"],
    ["export", "--patch", "edit", "--format", "onnx", "-o", "x"], ["export", "--patch", "hook-edit", "-o", "x"],
    ["export", "--patch", "edit", "--format", "lora", "-o", "x"], ["export", "--patch", "edit", "-o", "existing-dir"],
    ["export", "--patch", "edit", "--patch", "edit", "--format", "lora", "-o", "x"],
    # eval
    ["eval", "-c", "star", "-o", "run", "--seeds", ""], ["eval", "-c", "star", "-o", "run", "--seeds", "a-b"],
    ["eval", "-c", "star", "-o", "run", "--seeds", "0-" + "9" * 20], ["eval", "-c", "\udce9toile", "-o", "run"],
    ["erase", "-c", "\udce9toile", "-o", "out"], ["erase", "-c", "star", "-o", "\udce9"],
    ["erase", "-c", "star", "--set", "templates=[bold]x", "-o", "out"],
    ["eval", "-c", "zebra", "-o", "run"], ["eval", "-o", "run"], ["eval", "-c", "star", "-o", "run", "--judge", "nope"],
    ["eval", "-c", "star", "-o", "run", "--judge-set", "x"],
    ["eval", "-c", "star", "-o", "run", "--fid-features", "pixels"],
    ["eval", "-c", "star", "-o", "run", "--patch", "pic.png"], ["eval", "-c", "star", "-o", "existing-dir"],
    # demo, world, the command itself
    ["demo", "--concept", "zebra", "-o", "d"], ["demo", "--seeds", "", "-o", "d"],
    ["demo", "-o", "existing-dir", "--overwrite"], ["world", "train"], ["world", "train", "-o", "w", "--set", "nope=1"],
    ["world", "train", "-o", "w", "--set", "unet_steps=abc"], ["world", "train", "-o", "missing/w"],
    ["world", "nope"], ["nope"],
    ["sae", "train"], ["sae", "train", "-o", "s", "--n-prompts", "0"], ["sae", "train", "-o", "s", "--prompts-file", "nope"],
    ["sae", "train", "-o", "s", "--prompts-file", "latin1.txt"], ["sae", "train", "-o", "s", "--set", "k=0"],
    ["sae", "train", "-o", "s", "--model", "pic.png"], ["sae", "train", "-o", "existing-dir"],
    # attack, and replaying its artefact
    ["attack", "-c", "zebra", "-a", "textual-inversion", "-p", "edit", "-o", "r"],
    ["attack", "-c", "star", "-a", "nope", "-p", "edit", "-o", "r"], ["attack", "-c", "star", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "--set", "steps=0", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "--set", "token=adv", "--seeds", "0",
     "--sets", "target", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "--set", "num_vectors=16", "--set", "steps=1",
     "--seeds", "0", "--sets", "target", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "--sets", "neighbours", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "--seeds", "", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "sdxl-edit", "-o", "r"],
    ["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "-o", "existing-dir"],
    ["generate", "a <adv>", "--adversarial", "nope", "-o", "g.png"],
    ["generate", "a <adv>", "--adversarial", "pic.png", "-o", "g.png"],
    ["generate", "a <adv>", "--adversarial", "adv-other", "-p", "edit", "-o", "g.png"],
    ["generate", "a red star", "--adversarial", "adv-run", "-p", "edit", "-o", "g.png"],
    ["eval", "-c", "star", "-p", "edit", "--attack", "nope", "-o", "run"],
    ["eval", "-c", "star", "-p", "edit", "--attack", "textual-inversion", "--attack-seeds", "x", "-o", "run"],
] + setting_cases() + attack_setting_cases()


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
    assert {c[0] for c in CASES} >= {"generate", "erase", "export", "eval", "demo", "world", "attack"}


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(a)[:60])
def test_bad_invocation_is_one_line_and_writes_nothing(argv, workdir, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    before = tree_hash(workdir)
    code = run(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert tree_hash(workdir) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_random_concepts_prompts_seeds_and_settings_fail_only_with_erasekit_errors(world_pipe, text):
    for call in (lambda: erasekit.erase(world_pipe, text, method="uce"),
                 lambda: generate(world_pipe, text, n=1, num_inference_steps=1),
                 lambda: parse_seeds(text),
                 lambda: apply_overrides(UCEConfig(), [text]),
                 lambda: apply_overrides(UCEConfig(), [f"lam={text}"]),
                 lambda: apply_overrides(UCEConfig(), [f"templates={text}"])):
        try:
            call()
        except ErasekitError:
            pass
