"""Nothing of the user's is lost: outputs replace only folders erasekit wrote, runs that fail
leave the previous output intact, and bad files get one line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import erasekit
from erasekit.cli import app
from erasekit.concepts import load_concepts
from erasekit.errors import ErasekitError, InvalidInputError, OutputPathError
from erasekit.io import MARKER, atomic_dir

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_erasekits_own_folders_are_replaced_and_only_when_asked(tmp_path):
    with atomic_dir(tmp_path / "run") as d:
        (d / "metrics.json").write_text("{}")
    assert (tmp_path / "run" / MARKER).is_file()
    with pytest.raises(OutputPathError, match="already exists"):
        with atomic_dir(tmp_path / "run"):
            pass
    with atomic_dir(tmp_path / "run", overwrite=True) as d:
        (d / "metrics.json").write_text('{"second": 1}')
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"second": 1}
    # a file the user put in the run folder makes it theirs: refused, untouched
    (tmp_path / "run" / "my-notes.txt").write_text("mine")
    before = snapshot(tmp_path / "run")
    with pytest.raises(OutputPathError, match="did not write \\(my-notes.txt\\)"):
        with atomic_dir(tmp_path / "run", overwrite=True):
            pass
    assert snapshot(tmp_path / "run") == before
    # a folder erasekit never wrote (~/Documents) is never replaced
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.tex").write_text("x")
    with pytest.raises(OutputPathError, match="erasekit did not write"):
        with atomic_dir(docs, overwrite=True):
            pass
    assert (docs / "thesis.tex").read_text() == "x"


def test_a_failed_replacement_keeps_the_previous_output_and_no_temporary_files(tmp_path):
    with atomic_dir(tmp_path / "run") as d:
        (d / "a.txt").write_text("first")
    before = snapshot(tmp_path / "run")
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(tmp_path / "run", overwrite=True) as d:
            (d / "a.txt").write_text("half")
            raise OSError(28, "No space left on device")  # ENOSPC while writing the new output
    assert snapshot(tmp_path / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_temporary_folders_of_a_killed_run_are_cleaned_on_the_next_start(tmp_path):
    stale = tmp_path / ".run.999999999.abcd.tmp"  # a pid that cannot be alive
    stale.mkdir()
    (stale / "half.json").write_text("{")
    with atomic_dir(tmp_path / "run") as d:
        (d / "a.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_demo_replaces_only_its_own_run_folder(tmp_path, monkeypatch):
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    r = runner.invoke(app, ["demo", "--seeds", "0-1", "-o", str(mine), "--overwrite"])
    assert r.exit_code == 2 and "erasekit did not write" in r.output, r.output
    assert snapshot(mine) == {"thesis.tex": b"x"}


def test_concept_files_take_preserve_and_anchor_or_refuse_a_conflict(tmp_path):
    (tmp_path / "c.csv").write_text("target,anchor\nstar,\nheart,shape\n")
    cs = load_concepts(tmp_path / "c.csv", preserve="circle,moon")
    assert [c.preserve for c in cs] == [("circle", "moon"), ("circle", "moon")]
    assert load_concepts(tmp_path / "c.csv", anchor="")[1].anchor == "shape"
    with pytest.raises(InvalidInputError, match="gives its own anchor for 'heart' and --anchor"):
        load_concepts(tmp_path / "c.csv", anchor="thing")
    (tmp_path / "c.json").write_text(json.dumps(["star", {"target": "heart"}, {"target": "moon", "preserve": ["sun"]}]))
    with pytest.raises(InvalidInputError, match="gives its own preserve for 'moon'"):
        load_concepts(tmp_path / "c.json", preserve="circle")
    (tmp_path / "d.json").write_text(json.dumps(["star", {"target": "heart"}]))
    assert [c.preserve for c in load_concepts(tmp_path / "d.json", preserve="circle")] == [("circle",), ("circle",)]


def test_a_phrase_longer_than_the_context_is_refused(world_pipe):
    with pytest.raises(InvalidInputError, match="longer than the 20 tokens the text encoder reads"):
        erasekit.erase(world_pipe, "star " * 30, method="uce")


def test_broken_model_folders_are_one_line(tmp_path):
    import shutil

    from erasekit.world.assets import model_path

    bad = tmp_path / "model"
    shutil.copytree(model_path(), bad)
    (bad / "erasekit.json").write_text(json.dumps({"world": True}))  # no "sampling": SD's defaults
    from erasekit.models import load_pipeline, sampling_defaults

    assert sampling_defaults(str(bad)) == {"num_inference_steps": 50, "guidance_scale": 7.5}
    (bad / "erasekit.json").write_text(json.dumps({"sampling": {"num_inference_steps": "many"}}))
    with pytest.raises(ErasekitError, match="integer num_inference_steps"):
        sampling_defaults(str(bad))
    unet_file = next((bad / "unet").glob("*.safetensors"))
    unet_file.write_bytes(b"\x00" * 64)
    with pytest.raises(ErasekitError, match="could not load model"):
        load_pipeline(str(bad), device="cpu")
    r = runner.invoke(app, ["generate", "a star", "--patch", str(unet_file), "-o", str(tmp_path / "g.png")])
    assert r.exit_code == 2 and "is a file, not an edit folder" in r.output
