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
    assert (tmp_path / "run").stat().st_mode & 0o755 == 0o755  # a plain folder, not mkdtemp's 0700
    assert (tmp_path / "run" / "metrics.json").stat().st_mode & 0o644 == 0o644
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


def test_a_run_killed_between_its_two_renames_gets_its_previous_output_back(tmp_path):
    with atomic_dir(tmp_path / "run") as d:
        (d / "a.txt").write_text("previous")
    aside = tmp_path / ".run.999999999.xyz12345.old.tmp"  # killed after moving the old output aside
    aside.mkdir()
    (tmp_path / "run").rename(aside / "run")
    with pytest.raises(OutputPathError, match="already exists"):  # the next start restores it first
        with atomic_dir(tmp_path / "run"):
            pass
    assert (tmp_path / "run" / "a.txt").read_text() == "previous" and not aside.exists()


def test_temporary_folders_of_a_killed_run_are_cleaned_on_the_next_start(tmp_path):
    stale = tmp_path / ".run.999999999.abcd1234.tmp"  # a pid that cannot be alive
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


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    import errno

    import safetensors.torch

    from erasekit.cli import run

    out = tmp_path / "edit"
    assert run(["erase", "-c", "star", "-o", str(out)]) == 0
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert run(["erase", "-c", "heart", "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not write") and "No space left" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["edit"]


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_an_interrupted_export_leaves_no_output_and_the_next_run_completes(tmp_path, signal_name):
    """Killed while the exported pipeline is being written: nothing where the output belongs (SIGINT
    cleans its temporary folder at once, SIGKILL leaves a hidden one that the next run removes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    erasekit.erase(erasekit.load_pipeline(device="cpu"), "star", method="uce").save(tmp_path / "edit")
    cmd = [sys.executable, "-c", "from erasekit.cli import main; main()", "export", "--patch", str(tmp_path / "edit"),
           "-o", str(tmp_path / "out")]
    import shutil

    for _ in range(3):  # the signal can land after the final rename: then the output is whole; try again
        # a child inherits an ignored SIGINT (and Python then never raises KeyboardInterrupt): whatever an
        # earlier test or library did to this process's handler, the child starts with the default one
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.*.tmp")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "export finished before it could be interrupted"
        os.kill(proc.pid, getattr(signal, signal_name))
        proc.wait(timeout=60)
        if not (tmp_path / "out").exists():
            break
        # the interrupt came after the output was in place: it must be whole, and nothing was tested
        assert (tmp_path / "out" / "model_index.json").is_file() and not list(tmp_path.glob(".out.*.tmp"))
        shutil.rmtree(tmp_path / "out")
    else:
        pytest.skip(f"the export finished before the signal landed three times (this process's SIGINT handler: "
                    f"{signal.getsignal(signal.SIGINT)!r})")
    assert not (tmp_path / "out").exists()
    if signal_name == "SIGINT":
        assert not list(tmp_path.glob(".out.*"))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert (tmp_path / "out" / "model_index.json").is_file() and not list(tmp_path.glob(".out.*"))


def test_saved_edits_are_readable_like_any_file(tmp_path, world_pipe):
    erasekit.erase(world_pipe, "star", method="uce").save(tmp_path / "e")  # safetensors alone writes 0600
    assert all(p.stat().st_mode & 0o644 == 0o644 for p in (tmp_path / "e").iterdir())


def test_what_is_not_ours_is_never_cleaned_or_replaced(tmp_path):
    (tmp_path / ".notes.999999999.tmp").write_text("a user's file")  # not one of our temporary names
    (tmp_path / ".ab.999999999.zz123456.old.tmp").mkdir()  # a dead run's aside of output "ab"
    with atomic_dir(tmp_path / "notes") as d:
        (d / "a").write_text("x")
    with atomic_dir(tmp_path / "a?") as d:  # a glob character in the name matches nothing else
        (d / "a").write_text("x")
    assert (tmp_path / ".notes.999999999.tmp").read_text() == "a user's file"
    assert (tmp_path / ".ab.999999999.zz123456.old.tmp").is_dir()
    # a file the user put into a subfolder of an erasekit folder makes it theirs
    with atomic_dir(tmp_path / "run") as d:
        (d / "images").mkdir()
        (d / "images" / "0.png").write_bytes(b"png")
    (tmp_path / "run" / "images" / "my_notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="did not write"):
        with atomic_dir(tmp_path / "run", overwrite=True):
            pass
    # a hand-edited marker is not a traceback
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / MARKER).write_text('{"files": [{}]}')
    (tmp_path / "m" / "x").write_text("x")
    with pytest.raises(OutputPathError, match="did not write"):
        with atomic_dir(tmp_path / "m", overwrite=True):
            pass


def test_a_folder_that_appears_during_the_run_is_not_replaced(tmp_path):
    with pytest.raises(OutputPathError, match="already exists"):
        with atomic_dir(tmp_path / "out") as d:
            (d / "a.txt").write_text("ours")
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "user.txt").write_text("theirs")
    assert snapshot(tmp_path / "out") == {"user.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_generate_does_not_overwrite_an_image_unasked(tmp_path, monkeypatch, capsys):
    from erasekit.cli import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.png").write_bytes(b"my picture")
    assert run(["generate", "a star", "-n", "1", "--steps", "1"]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "grid.png").read_bytes() == b"my picture"
    (tmp_path / "grid.png").chmod(0o600)
    assert run(["generate", "a star", "-n", "1", "--steps", "1", "--overwrite"]) == 0
    assert (tmp_path / "grid.png").read_bytes() != b"my picture"
    assert (tmp_path / "grid.png").stat().st_mode & 0o777 == 0o600  # a replaced file keeps the user's mode


def test_an_image_that_appears_during_generate_is_not_replaced(tmp_path, monkeypatch, capsys):
    """generate checks -o before its long run; a file put there meanwhile is kept and the run fails in one
    line, and the image it writes otherwise has a plain file's mode (mkstemp's 0600 was kept before)."""
    import erasekit.generate as gen_mod
    from erasekit.cli import run

    real = gen_mod.generate

    def generate_then_user_writes(*args, **kwargs):
        images = real(*args, **kwargs)
        (tmp_path / "g.png").write_bytes(b"the user's picture")
        return images

    monkeypatch.setattr(gen_mod, "generate", generate_then_user_writes)
    assert run(["generate", "a star", "-n", "1", "--steps", "1", "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "appeared while this ran" in err and len(err.splitlines()) == 1
    assert (tmp_path / "g.png").read_bytes() == b"the user's picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]
    monkeypatch.setattr(gen_mod, "generate", real)
    assert run(["generate", "a star", "-n", "1", "--steps", "1", "-o", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_mode & 0o644 == 0o644


def test_an_unreadable_concepts_file_is_not_called_a_write_error(tmp_path, capsys, monkeypatch):
    from erasekit.cli import run

    f = tmp_path / "c.txt"
    f.write_text("star\n")
    real = Path.read_text

    def denied(self, *args, **kwargs):  # chmod 0 does not stop root, who runs CI here
        if self == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert run(["erase", "--concepts-file", str(f), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not read concepts file" in err and "write" not in err and len(err.splitlines()) == 1
