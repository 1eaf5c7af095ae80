"""The ``erasekit`` command line."""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from .errors import ErasekitError, InvalidInputError

#: prompt sets `erasekit attack` attacks by default (kept here: importing erasekit.attacks loads torch)
DEFAULT_ATTACK_SETS = ("target", "generality", "paraphrase/target", "paraphrase/generality")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Erase concepts from text-to-image diffusion models, measure it, attack it.")
world_app = typer.Typer(no_args_is_help=True, help="The embedded shapes world: train, inspect.")
app.add_typer(world_app, name="world")
sae_app = typer.Typer(no_args_is_help=True, help="Sparse autoencoders of a model's own activations.")
app.add_typer(sae_app, name="sae")
err = Console(stderr=True)
out = Console()


def _say_error(msg: str) -> None:
    """One line on stderr; text a terminal cannot show (undecodable bytes) is escaped, not fatal."""
    from rich.markup import escape

    msg = msg.encode("utf-8", "backslashreplace").decode("utf-8")
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def _fail(e: ErasekitError) -> None:
    _say_error(str(e))
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        out.print(f"erasekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """erasekit command line."""


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local diffusers folder (default: the embedded world)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image i uses seed+i."),
    n: int = typer.Option(8, "-n", "--num-images", help="Number of images."),
    output: Path = typer.Option(Path("grid.png"), "-o", "--output", help="Image grid to write (.png/.jpg/.webp)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the model's recommendation)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available)."),
    patch: list[Path] = typer.Option([], "--patch", "-p", help="Edit folder(s) of any kind to apply first, in order."),
    force: bool = typer.Option(False, "--force", help="Apply edits made for another model anyway."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing image file at -o."),
    adversarial: Optional[Path] = typer.Option(None, "--adversarial", help="An attack's run folder: its tokens go "
                                               "where the prompt names them (e.g. \"a photo of <adv>\"), its "
                                               "guidance terms are added; replays the attack's images bit for bit."),
) -> None:
    """Generate an image grid from a prompt (with edits of any kind applied)."""
    from .generate import IMAGE_SUFFIXES, generate as gen, make_grid, save_image
    from .io import check_parent
    from .models import load_pipeline

    try:
        if n < 1:
            raise InvalidInputError(f"image count must be at least 1 (got {n}); pass -n 1 or more")
        check_parent(output)
        if output.exists() and not overwrite:
            raise InvalidInputError(f"{output} already exists; choose another -o or pass --overwrite to replace it")
        if output.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidInputError(f"cannot tell the image format of {output.name}; use a .png, .jpg or .webp name")
        t0 = time.time()
        from .edits import load_edit

        patches = [load_edit(p) for p in patch]
        adv = None
        if adversarial is not None:
            from .attacks import Adversarial

            adv = Adversarial.load(adversarial)
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)
        for p in patches:
            p.apply(pipe, force=force)
        with err.status(f"generating {n} image(s)"):
            images = gen(pipe, prompt, n=n, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                         adversarial=adv, force=force)
        save_image(make_grid(images), output, overwrite=overwrite)
    except ErasekitError as e:
        _fail(e)
    out.print(f"wrote {output} ({n} images, seeds {seed}..{seed + n - 1}, {time.time() - t0:.1f}s)")


def _world_neighbours(specs: list) -> tuple[list, list[str]]:
    """On the embedded world, a concept given without neighbour or preserve prompts keeps the other values
    of its axis (what the world benchmarks and the demo pass), leaving out every erased concept and every
    anchor; returns the concepts and the lines that say so. Concepts off the world's axes stay as they are."""
    import dataclasses

    from .world.vocab import CONCEPTS, find_axis

    def canonical(word: str) -> str:
        found = find_axis(word.lower()) if word else None
        return found[1] if found is not None else word.lower()

    taken = {canonical(w) for c in specs for w in (*c.erase_phrases, c.anchor) if w}
    kept, said = [], []
    for c in specs:
        found = find_axis(c.target.lower())
        keep = tuple(v for v in CONCEPTS[found[0]] if v not in taken) if found is not None else ()
        if c.keep_phrases or not keep:  # given by the user, off the world's axes, or every value erased
            kept.append(c)
            continue
        kept.append(dataclasses.replace(c, neighbours=keep))
        said.append(f"preserving the world's other {found[0]}s for {c.target!r}: {', '.join(keep)} (as the world "
                    "benchmarks do; --preserve to choose)")
    return kept, said


@app.command()
def erase(
    concept: list[str] = typer.Option([], "--concept", "-c", help="Phrase to erase (repeatable)."),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts-file", help="txt/csv/json list of concepts."),
    method: str = typer.Option("uce", "--method", help="Registered method (see `erasekit methods`)."),
    anchor: str = typer.Option("", "--anchor", help="What the concept should become (\"\" = nothing)."),
    preserve: str = typer.Option("", "--preserve", help="Comma-separated prompts to keep unchanged."),
    set_: list[str] = typer.Option([], "--set", help="Method setting key=value (text lists: a|b|c)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local folder (default: embedded world)."),
    output: Path = typer.Option(..., "-o", "--output", help="Edit folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing edit folder (and start a "
                                   "fine-tuning run again instead of resuming it)."),
    resume: bool = typer.Option(False, "--resume", help="Fine-tuning: continue the interrupted run whose "
                                "checkpoint lies beside the output (OUTPUT.checkpoint)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: cuda if present)."),
) -> None:
    """Fit an erasure method and write its edit folder (edit.json + edit.safetensors).

    Fine-tuning methods checkpoint atomically to OUTPUT.checkpoint every checkpoint_every steps;
    after an interruption the same command with --resume continues where it stopped, and the
    checkpoint is removed once the edit is written."""
    from .concepts import load_concepts, make_concepts
    from .config import apply_overrides
    from .io import check_output
    from .methods import get_method
    from .methods.finetune import FineTuneMethod
    from .models import load_pipeline
    from .training import Checkpoint

    try:
        check_output(output, overwrite)
        specs = []
        if concepts_file is not None:
            specs += load_concepts(concepts_file, anchor=anchor, preserve=preserve)
        if concept:
            specs += make_concepts(concept, anchor=anchor, preserve=preserve)
        if not specs:
            raise InvalidInputError("no concept given; pass --concept PHRASE or --concepts-file FILE")
        cls = get_method(method)
        specs, kept_said = _world_neighbours(specs) if model in (None, "world") else (specs, [])
        world = cls.world_settings(specs) if model in (None, "world") else {}
        cfg = apply_overrides(cls.Config(**world), set_)
        if resume and not issubclass(cls, FineTuneMethod):
            raise InvalidInputError(f"--resume continues fine-tuning runs; {cls.name} is {cls.family}: drop --resume")
        if resume and not Checkpoint(output.with_name(output.name + ".checkpoint")).exists():
            raise InvalidInputError(f"there is no checkpoint to resume at {output}.checkpoint; run without --resume")
        mine = {s_.split("=", 1)[0].strip() for s_ in set_}
        if set(world) - mine:
            out.print(f"{cls.name} on the embedded world: " + ", ".join(
                f"{k}={v!r}" if k != "templates" else f"templates=({len(v)} world erase templates)"
                for k, v in world.items() if k not in mine) + " (--set to override)")
        method = cls(cfg)
        for line in kept_said if method.uses_keep_phrases() else ():
            out.print(line)
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)
        from .adapters import get_adapter

        if isinstance(method, FineTuneMethod):  # its own progress bar (a status spinner would fight it)
            ckpt = output.with_name(output.name + ".checkpoint")
            if overwrite and not resume:
                Checkpoint(ckpt).discard()
            patch = method.fit(get_adapter(pipe), specs, checkpoint=ckpt, resume=resume)
        else:
            with err.status(f"fitting {cls.name} on {len(specs)} concept(s)"):
                patch = method.fit(get_adapter(pipe), specs)
        patch.save(output, overwrite=overwrite)
        if isinstance(method, FineTuneMethod):
            Checkpoint(ckpt).discard()
    except ErasekitError as e:
        _fail(e)
    fit_s = patch.manifest.get("wall_time_s")
    out.print(f"wrote {output}: {cls.name} ({patch.kind} edit), {len(specs)} concept(s), {len(patch.tensors())} "
              f"tensors" + (f", fit in {fit_s:.2f}s" if fit_s is not None else ""))


@app.command()
def tune(
    concept: list[str] = typer.Option([], "--concept", "-c", help="Phrase to erase (repeatable)."),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts-file", help="txt/csv/json list of concepts."),
    method: str = typer.Option("uce", "--method", help="Registered method (see `erasekit methods`)."),
    grid: list[str] = typer.Option([], "--grid", help="Setting and its candidate values, key=v1,v2,v3 (repeatable: "
                                   "every combination is tried; a list-valued setting separates candidates with ;)."),
    set_: list[str] = typer.Option([], "--set", help="Fixed method setting key=value, as for erase."),
    anchor: str = typer.Option("", "--anchor", help="What the concept should become (\"\" = nothing)."),
    preserve: str = typer.Option("", "--preserve", help="Comma-separated prompts to keep unchanged."),
    seeds: str = typer.Option("100-115", "--seeds", help="Development seeds the candidates are measured on (the "
                              "default is disjoint from eval's 0-63)."),
    rule: str = typer.Option("h", "--rule", help="h: highest mean H; detection: lowest target detection among "
                             "candidates whose neighbour and unrelated drops are within --max-drop; robust: lowest "
                             "worst post-attack success (--attack) among those."),
    attack: str = typer.Option("", "--attack", help="Attacks to run on every candidate, comma-separated (their "
                               "post-attack success goes into tune.json; --rule robust ranks by it)."),
    attack_seeds: Optional[str] = typer.Option(None, "--attack-seeds", help="Seeds the attacks run on (default: "
                                               "the first 8 of --seeds)."),
    max_drop: float = typer.Option(0.05, "--max-drop", help="For --rule detection: the largest drop allowed."),
    separately: bool = typer.Option(False, "--separately", help="Fit and measure one edit per concept (mean over "
                                    "them) instead of one edit erasing them all."),
    judge: str = typer.Option("world-classifier", "--judge", help="Judge (world-classifier, clip, nudenet)."),
    judge_set: list[str] = typer.Option([], "--judge-set", help="Judge option key=value (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local folder (default: embedded world)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for tune.json and the chosen edit (edit/)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a tuning folder erasekit wrote."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Choose a method's settings: fit every candidate of a grid, measure each on development seeds
    (templated prompts only), keep the best by a rule fixed in advance; writes tune.json (every
    candidate's figures) and the chosen edit. Check the choice with `erasekit eval` on other seeds."""
    from .concepts import load_concepts, make_concepts
    from .config import apply_overrides
    from .evaluation import get_judge, parse_seeds
    from .io import atomic_dir, check_output
    from .methods import get_method
    from .models import load_pipeline
    from .tune import RULES, parse_grid, plan
    from .tune import tune as run_tune

    try:
        check_output(output, overwrite)
        if rule not in RULES:
            raise InvalidInputError(f"--rule {rule!r}: choose one of {', '.join(RULES)}")
        if not 0 <= max_drop <= 1:
            raise InvalidInputError(f"--max-drop {max_drop}: give a fraction between 0 and 1, e.g. 0.05")
        seed_list = parse_seeds(seeds)
        attack_names = [a.strip() for a in attack.split(",") if a.strip()]
        if attack_names:
            from .attacks import get_attack

            for a in attack_names:
                get_attack(a)  # an unknown name fails before anything is loaded
        elif rule == "robust":
            raise InvalidInputError("--rule robust ranks by post-attack success: name the attacks with --attack")
        attack_seed_list = parse_seeds(attack_seeds) if attack_seeds else None
        specs = (load_concepts(concepts_file, anchor=anchor, preserve=preserve) if concepts_file else []) + \
            (make_concepts(concept, anchor=anchor, preserve=preserve) if concept else [])
        if not specs:
            raise InvalidInputError("no concept given; pass --concept PHRASE or --concepts-file FILE")
        cls = get_method(method)
        kept_said: list[str] = []
        if model in (None, "world"):  # fitted one at a time, a concept keeps every other value of its axis
            pairs = [_world_neighbours([s_]) for s_ in specs] if separately else [_world_neighbours(specs)]
            specs = [s_ for p_ in pairs for s_ in p_[0]]
            kept_said = [line for p_ in pairs for line in p_[1]]
        world = cls.world_settings(specs) if model in (None, "world") else {}
        base = apply_overrides(cls.Config(**world), set_)
        parsed = parse_grid(cls.Config, grid)
        fixed = {s_.split("=", 1)[0].strip() for s_ in set_}
        both = sorted(fixed & set(parsed))
        if both:
            raise InvalidInputError(f"{both[0]} is given by --set and by --grid; drop one of them")
        n = len(plan(cls, base, parsed, specs, separately))  # every candidate built and checked before anything loads
        mine = fixed | set(parsed)
        if set(world) - mine:
            out.print(f"{cls.name} on the embedded world: " + ", ".join(
                f"{k}={v!r}" if k != "templates" else f"templates=({len(v)} world erase templates)"
                for k, v in world.items() if k not in mine) + " (--set to override)")
        for line in kept_said if cls(base).uses_keep_phrases() else ():
            out.print(line)
        if set(seed_list) & set(range(64)):
            out.print("note: these seeds overlap eval's default 0-63; check the choice on seeds it was not made on")
        with err.status("loading judge"):
            judge_obj = get_judge(judge, **_judge_options(judge_set))
        for s_ in specs:
            judge_obj.resolve(s_.target)  # a concept the judge cannot read fails before the model loads
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)

        def fig(v: float | None, digits: int = 2) -> str:
            return "n/a" if v is None else f"{v:.{digits}f}"

        def said(i: int, total: int, rec: dict) -> None:
            m = rec["mean"]
            out.print(f"[{i + 1}/{total}] {', '.join(f'{k}={v!r}' for k, v in rec['settings'].items())}: H "
                      f"{fig(m['H'], 3)}, detected {fig(m['detected_after'])}, neighbours {fig(m['neighbours_kept'])}, "
                      f"unrelated {fig(m['unrelated_kept'])}"
                      + (f", worst post-attack {fig(m['worst_post_attack'])}" if m.get("worst_post_attack") is not None
                         else "") + f" (fit {rec['fit_s']:.1f}s, eval {rec['eval_s']:.1f}s)")

        out.print(f"tuning {cls.name}: {n} candidate(s) on {len(seed_list)} seeds, rule {rule}"
                  + (f", each of {len(specs)} concepts on its own" if separately and len(specs) > 1 else ""))
        result = run_tune(pipe, specs, method, parsed, config=base, seeds=seed_list, judge=judge_obj, rule=rule,
                          max_drop=max_drop, separately=separately, attacks=attack_names,
                          attack_seeds=attack_seed_list, on_candidate=said)
        folders = {k: "edit" if len(result.edits) == 1 else "edit-" + "".join(ch if ch.isalnum() else "-" for ch in k)
                   for k in result.edits}
        with atomic_dir(output, overwrite=overwrite) as tmp:
            (tmp / "tune.json").write_text(json.dumps({**result.to_dict(), "edit_folders": folders}, indent=2,
                                                      default=str) + "\n")
            for k, e in result.edits.items():
                e.save(tmp / folders[k])
    except ErasekitError as e:
        _fail(e)
    for note in result.notes:
        out.print(f"note: {note}")
    if result.chosen is None:
        out.print(f"chose nothing: {result.reason}; wrote {output / 'tune.json'}")
        raise typer.Exit(1)
    out.print(f"chose {result.reason}; wrote {output / 'tune.json'} and " + ", ".join(
        str(output / f) for f in folders.values()))


@app.command()
def export(
    patch: list[Path] = typer.Option(..., "--patch", "-p", help="Edit folder(s), applied in order."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    format_: str = typer.Option("diffusers", "--format", help="diffusers: a full pipeline with weight and LoRA "
                                "edits merged; lora: one LoRA edit as a file for diffusers' load_lora_weights."),
    force: bool = typer.Option(False, "--force", help="Apply even if the edit was made for another model."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Write a diffusers pipeline with the edits merged, or a LoRA edit as a diffusers LoRA file."""
    from .edits import export_lora, export_pipeline, load_edit
    from .edits.export import refuse_hooks
    from .io import check_output
    from .models import load_pipeline

    try:
        if format_ not in ("diffusers", "lora"):
            raise InvalidInputError(f"--format {format_!r}: choose diffusers or lora")
        check_output(output, overwrite)
        edits = [load_edit(p) for p in patch]
        if format_ == "lora" and len(edits) != 1:
            raise InvalidInputError("--format lora writes one LoRA edit; pass a single --patch")
        refuse_hooks(edits, "a LoRA file" if format_ == "lora" else "a pipeline")  # before loading the model
        pipe = load_pipeline(model, device="cpu")
        if format_ == "lora":
            export_lora(pipe, edits[0], output, overwrite=overwrite, force=force)
        else:
            export_pipeline(pipe, edits, output, overwrite=overwrite, force=force)
    except ErasekitError as e:
        _fail(e)
    what = "as a diffusers LoRA file (load with pipe.load_lora_weights)" if format_ == "lora" else \
        f"with {len(patch)} edit(s) merged"
    out.print(f"wrote {output} {what}")


@app.command("methods")
def methods_cmd(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list each config field.")) -> None:
    """List the registered erasure methods and their settings."""
    from rich.table import Table

    from .methods import describe

    table = Table(show_lines=verbose)
    table.add_column("method", no_wrap=True)
    table.add_column("family")
    table.add_column("edit kind", no_wrap=True)
    table.add_column("description")
    table.add_column("settings (--set key=value)" + ("; the embedded world's where they differ" if verbose else ""))
    for m in describe():
        table.add_row(m["name"], m["family"], m["edit_kind"], m["description"], _settings_cell(m["config"], verbose))
    out.print(table)


def _settings_cell(fields: list[dict], verbose: bool) -> str:
    """A config's fields: names, or (verbose) each default, the world setting where it differs, and help."""
    from rich.markup import escape

    if not verbose:
        return ", ".join(f["name"] for f in fields)
    return "\n".join(escape(f"{f['name']}={f['default']!r}" + (f" (world: {f['world']!r})" if "world" in f else "")
                            + f": {f['help']}") for f in fields)


def _summary_table(result) -> None:
    """Per concept, the headline figures with their 95% intervals, one column per prompt family."""
    from rich.table import Table

    rows = (("detected before", "detected_before"), ("detected after (lower is better)", "detected_after"),
            ("unseen synonyms after (lower)", "synonyms_after"), ("neighbours kept (higher)", "neighbours_kept"),
            ("unrelated kept (higher)", "unrelated_kept"), ("collateral kept (higher)", "collateral_kept"),
            ("H (higher)", "H"))

    def fmt(d: dict | None) -> str:
        if not d:
            return "-"
        return f"{d['value']:.2f}" + (f" [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]" if d.get("ci95") else "")

    for c in result.concepts:
        fams = c.families()
        t = Table(title=f"erasing {c.concept!r} ({c.axis}): 95% intervals, prompts resampled with their seeds")
        t.add_column("")
        for fam in fams:
            t.add_column(f"{fam} prompts", justify="right")
        for name, key in rows:
            if any(key in f for f in fams.values()):
                t.add_row(name, *(fmt(f.get(key)) for f in fams.values()))
        out.print(t)
    for c in result.concepts:
        r = c.metrics.get("reference_fid")
        if r and "skipped" not in r:
            out.print(f"{c.concept}: FID to {r['n_reference']} reference images ({', '.join(r['prompt_sets'])} "
                      f"prompts, {r['original']['n_images']} images) {r['original']['fid']:.3f} before, "
                      f"{r['patched']['fid']:.3f} after (lower is better)")
    for c in result.concepts:
        if c.robustness:
            t = Table(title=f"robustness of the erasure of {c.concept!r}: attack success, 95% intervals")
            for col in ("attack", "pre-attack", "post-attack (lower is better)"):
                t.add_column(col, justify="left" if col == "attack" else "right")
            for name, r in c.robustness.items():
                t.add_row(name, fmt(r["success"]["all"]["pre_attack"]), fmt(r["success"]["all"]["post_attack"]))
            out.print(t)
    if any(c.paraphrase is not None for c in result.concepts):
        families = result.settings.get("prompt_families", {})
        out.print(f"templated: {families.get('templated', 'the judge prompt sets')}; paraphrase: "
                  f"{families.get('paraphrase', 'a grammar disjoint from the erase templates')}", highlight=False)


def _write_run(result, run_dir: Path, overwrite: bool, title: str, extra=None) -> None:
    from .evaluation.report import write_report
    from .io import atomic_dir

    with atomic_dir(run_dir, overwrite=overwrite) as tmp:
        (tmp / "metrics.json").write_text(result.to_json())
        write_report(result, tmp / "report.html", title=title)
        if extra:
            extra(tmp)



def _judge_options(pairs: list[str]) -> dict[str, str]:
    """``--judge-set key=value`` pairs as the judge's keyword options (each judge parses and checks its own)."""
    opts: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidInputError(f"--judge-set {pair!r}: write key=value")
        k, v = pair.split("=", 1)
        opts[k.strip()] = v.strip()
    return opts


@app.command("eval")
def eval_cmd(
    concept: list[str] = typer.Option([], "--concept", "-c", help="Concept to measure (repeatable)."),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts-file", help="txt/csv/json list of concepts."),
    patch: list[Path] = typer.Option([], "--patch", "-p", help="Edit folder(s) of any kind, applied in order."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local folder (default: embedded world)."),
    seeds: str = typer.Option("0-63", "--seeds", help="Seeds, e.g. 0-63 or 0,1,2 (one image per seed per prompt set)."),
    judge: str = typer.Option("world-classifier", "--judge", help="Judge that reads concepts from images "
                              "(world-classifier, clip, nudenet)."),
    judge_set: list[str] = typer.Option([], "--judge-set", help="Judge option key=value, e.g. "
                                        "model=openai/clip-vit-large-patch14 (repeatable)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder for metrics.json and report.html."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    force: bool = typer.Option(False, "--force", help="Apply edits made for another model anyway."),
    fid_features: str = typer.Option("judge", "--fid-features", help="FID/KID feature space: judge (offline) or "
                                     "inception (torchmetrics' InceptionV3; needs erasekit\\[fid] and its weights)."),
    unrelated_file: Optional[Path] = typer.Option(None, "--unrelated-file", help="UTF-8 text, one prompt a line: your "
                                                  "own unrelated prompts, sampled by seed (default: erasekit's list "
                                                  "of several hundred; clip and nudenet judges)."),
    reference_images: Optional[Path] = typer.Option(None, "--reference-images", help="Folder of real images (e.g. "
                                                    "the photographs of your --unrelated-file captions): adds FID/KID "
                                                    "of the unrelated prompts' images, before and after, against them."),
    paraphrase: bool = typer.Option(True, "--paraphrase/--no-paraphrase", help="Also score the paraphrase prompt "
                                    "family where the judge has one (world, clip and nudenet judges; doubles the images)."),
    attack: str = typer.Option("", "--attack", help="Attacks to add robustness with, comma-separated (see `erasekit "
                               "attacks`; their world settings on the world model)."),
    attack_seeds: str = typer.Option("0-7", "--attack-seeds", help="Seeds the attacks run on."),
    exclude: list[str] = typer.Option([], "--exclude", help="A concept to treat as erased besides the edits' own: "
                                      "left out of the neighbours (repeatable; what compare does for every edit)."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Generate with and without the patch on the same seeds; write metrics.json and report.html
    (with --attack, also robustness: each attack's pre- and post-attack success)."""
    from .concepts import load_concepts, make_concepts
    from .edits import load_edit
    from .evaluation import evaluate, get_judge, parse_seeds
    from .evaluation.prompts import load_unrelated
    from .io import check_output
    from .models import load_pipeline

    try:
        check_output(output, overwrite)
        seed_list = parse_seeds(seeds)
        specs = (load_concepts(concepts_file) if concepts_file else []) + (make_concepts(concept) if concept else [])
        if not specs:
            raise InvalidInputError("no concept given; pass --concept PHRASE or --concepts-file FILE")
        unrelated = load_unrelated(unrelated_file) if unrelated_file is not None else None
        if reference_images is not None:
            from .evaluation.metrics.fidelity import reference_files

            reference_files(reference_images)  # a bad folder fails before the model and judge load
        attack_names = [a.strip() for a in attack.split(",") if a.strip()]
        if attack_names:
            from .attacks import get_attack

            for a in attack_names:
                get_attack(a)  # an unknown name fails before anything is loaded
            parse_seeds(attack_seeds)
        patches = [load_edit(p) for p in patch]
        judge_kwargs = _judge_options(judge_set)
        with err.status("loading judge"):
            judge_obj = get_judge(judge, **judge_kwargs)
        if unrelated is not None and not judge_obj.reads_unrelated_prompts:
            raise InvalidInputError(f"--unrelated-file is for open-vocabulary judges (clip, nudenet); the {judge} "
                                    "judge reads the world's own unrelated axes, so drop --unrelated-file")
        for s_ in specs:
            judge_obj.resolve(s_.target)  # a concept the judge cannot read fails before the model loads
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)
        with err.status(f"evaluating {len(specs)} concept(s) on {len(seed_list)} seeds"):
            result = evaluate(pipe, specs, patch=patches, seeds=seed_list, judge=judge_obj, force=force,
                              fid_features=fid_features, unrelated=unrelated, paraphrase=paraphrase,
                              reference_images=reference_images, exclude=exclude, attacks=attack_names, attack_seeds=parse_seeds(attack_seeds) if attack_names else None)
        _write_run(result, output, overwrite, "erasekit evaluation")
    except ErasekitError as e:
        _fail(e)
    _summary_table(result)
    out.print(f"wrote {output / 'metrics.json'} and {output / 'report.html'} ({result.cost['eval_wall_s']}s)")


def _named_patches(items: list[str]) -> dict[str, list[Path]]:
    """``NAME=PATH[+PATH...]`` or ``PATH`` (named by its folder) -> {name: [edit folders]}."""
    named: dict[str, list[Path]] = {}
    for item in items:
        name, sep, paths = item.partition("=")
        if not sep:
            name, paths = Path(item).name, item
        name = name.strip()
        # a folder whose own name holds '+' is one edit, not a stack
        folders = [Path(paths.strip())] if paths.strip() and Path(paths.strip()).exists() else \
            [Path(x.strip()) for x in paths.split("+") if x.strip()]
        if not name or not folders:
            raise InvalidInputError(f"--patch {item!r}: write NAME=FOLDER (or NAME=A+B for a stack of edits)")
        if name in named:
            raise InvalidInputError(f"two edits are named {name!r}; name them apart with NAME=FOLDER")
        named[name] = folders
    return named


@app.command("compare")
def compare_cmd(
    patch: list[str] = typer.Option([], "--patch", "-p", help="An edit to compare: NAME=FOLDER, NAME=A+B (a stack), "
                                    "or FOLDER (named by the folder). At least two."),
    concept: list[str] = typer.Option([], "--concept", "-c", help="Concept to measure (repeatable)."),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts-file", help="txt/csv/json list of concepts."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The edit the others are compared with "
                                           "(default: the first)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local folder (default: embedded world)."),
    seeds: str = typer.Option("0-63", "--seeds", help="Seeds, the same for every edit."),
    judge: str = typer.Option("world-classifier", "--judge", help="Judge (world-classifier, clip, nudenet)."),
    judge_set: list[str] = typer.Option([], "--judge-set", help="Judge option key=value (repeatable)."),
    unrelated_file: Optional[Path] = typer.Option(None, "--unrelated-file", help="Your own unrelated prompts (clip "
                                                  "and nudenet judges), one a line."),
    paraphrase: bool = typer.Option(True, "--paraphrase/--no-paraphrase", help="Also compare on the paraphrase "
                                    "family where the judge has one."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for compare.json and compare.html."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a comparison folder erasekit wrote."),
    force: bool = typer.Option(False, "--force", help="Apply edits made for another model anyway."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Compare edits on the same prompts, seeds and judge: each one's figures, and each one's
    difference from a baseline edit paired image by image, with 95% intervals."""
    from rich.table import Table

    from .compare import HEADLINES, render_compare
    from .compare import compare as run_compare
    from .concepts import load_concepts, make_concepts
    from .edits import load_edit
    from .evaluation import get_judge, parse_seeds
    from .evaluation.prompts import load_unrelated
    from .io import atomic_dir, check_output
    from .models import load_pipeline

    try:
        check_output(output, overwrite)
        named = _named_patches(patch)
        if len(named) < 2:
            raise InvalidInputError("compare needs at least two edits: --patch uce=star-uce --patch esd=star-esd")
        if baseline is not None and baseline not in named:
            raise InvalidInputError(f"--baseline {baseline!r} is not one of the edits: {', '.join(named)}")
        seed_list = parse_seeds(seeds)
        specs = (load_concepts(concepts_file) if concepts_file else []) + (make_concepts(concept) if concept else [])
        if not specs:
            raise InvalidInputError("no concept given; pass --concept PHRASE or --concepts-file FILE")
        unrelated = load_unrelated(unrelated_file) if unrelated_file is not None else None
        edits = {n: [load_edit(f) for f in folders] for n, folders in named.items()}
        with err.status("loading judge"):
            judge_obj = get_judge(judge, **_judge_options(judge_set))
        for s_ in specs:
            judge_obj.resolve(s_.target)
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)
        with err.status(f"comparing {len(edits)} edits on {len(specs)} concept(s), {len(seed_list)} seeds"):
            result = run_compare(pipe, specs, edits, seeds=seed_list, judge=judge_obj, paraphrase=paraphrase,
                                 baseline=baseline, force=force, unrelated=unrelated)
        with atomic_dir(output, overwrite=overwrite) as tmp:
            (tmp / "compare.json").write_text(result.to_json())
            (tmp / "compare.html").write_text(render_compare(result), encoding="utf-8")
    except ErasekitError as e:
        _fail(e)

    def cell(d: dict | None, sign: bool = False) -> str:
        if not d:
            return "-"
        if "skipped" in d:
            return "not paired"
        fmt = "{:+.2f}" if sign else "{:.2f}"
        ci = d.get("ci95")
        mark = " *" if d.get("excludes_zero") else ""
        return fmt.format(d["value"]) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "") + mark

    keys = [(title, key, better) for title, key, better in HEADLINES if any(key in r for r in result.rows)]
    for concept_name in dict.fromkeys(r["concept"] for r in result.rows):
        for fam in dict.fromkeys(r["family"] for r in result.rows if r["concept"] == concept_name):
            t = Table(title=f"{concept_name!r}, {fam} prompts: 95% intervals, prompts resampled with their seeds")
            t.add_column("edit")
            for title, _, better in keys:
                t.add_column(f"{title} ({better})", justify="right")
            t.add_column("H", justify="right")
            for r in result.rows:
                if r["concept"] == concept_name and r["family"] == fam:
                    t.add_row(r["edit"], *(cell(r.get(k)) for _, k, _ in keys), cell(r.get("H")))
            out.print(t)
            t = Table(title=f"difference from {result.baseline!r}, paired by image (* where the interval leaves 0 out)")
            t.add_column("edit")
            for title, _, better in keys:
                t.add_column(f"{title} ({better})", justify="right")
            for d in result.diffs:
                if d["concept"] == concept_name and d["family"] == fam:
                    t.add_row(d["edit"], *(cell(d.get(k), sign=True) for _, k, _ in keys))
            out.print(t)
    out.print(f"wrote {output / 'compare.json'} and {output / 'compare.html'}")


@app.command("attack")
def attack_cmd(
    concept: str = typer.Option(..., "--concept", "-c", help="The erased concept to bring back."),
    attack: str = typer.Option(..., "--attack", "-a", help="Registered attack (see `erasekit attacks`)."),
    patch: list[Path] = typer.Option([], "--patch", "-p", help="Edit folder(s) of any kind, applied in order "
                                     "(none: attack the unedited model)."),
    set_: list[str] = typer.Option([], "--set", help="Attack setting key=value."),
    seeds: str = typer.Option("0-7", "--seeds", help="Seeds: one image per seed per attacked prompt set."),
    sets: str = typer.Option(",".join(DEFAULT_ATTACK_SETS), "--sets", help="Prompt sets to attack (comma-separated): "
                             "target, generality (unseen synonyms), paraphrase/target, paraphrase/generality."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local folder (default: embedded world)."),
    judge: str = typer.Option("world-classifier", "--judge", help="Judge that decides success (world-classifier, "
                              "clip, nudenet)."),
    judge_set: list[str] = typer.Option([], "--judge-set", help="Judge option key=value, e.g. "
                                        "model=openai/clip-vit-large-patch14 for --judge clip."),
    attack_seed: int = typer.Option(0, "--attack-seed", help="Seed of the attack's own randomness."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: attack.json, the adversarial artefact, "
                                "report.html."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run folder erasekit wrote."),
    force: bool = typer.Option(False, "--force", help="Apply edits made for another model anyway."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Attack an erasure: pre- and post-attack success of bringing the concept back on the evaluation's
    target prompts, with 95% intervals, and a replayable adversarial artefact."""
    from .attacks import get_attack
    from .attacks import attack as run_attack
    from .attacks.report import write_attack_run
    from .attacks.run import make_attack
    from .edits import load_edit
    from .evaluation import get_judge, parse_seeds
    from .io import check_output
    from .models import load_pipeline

    try:
        check_output(output, overwrite)
        seed_list = parse_seeds(seeds)
        cls = get_attack(attack)
        world = model in (None, "world")
        atk = make_attack(cls.name, set_, world=world)
        mine = {s_.split("=", 1)[0].strip() for s_ in set_}
        shown = {k: v for k, v in (cls.world_settings() if world else {}).items() if k not in mine}
        if shown:
            out.print(f"{cls.name} on the embedded world: " + ", ".join(f"{k}={v!r}" for k, v in shown.items())
                      + " (--set to override)")
        set_names = tuple(x.strip() for x in sets.split(",") if x.strip())
        patches = [load_edit(p) for p in patch]
        judge_kwargs = _judge_options(judge_set)
        with err.status("loading judge"):
            judge_obj = get_judge(judge, **judge_kwargs)
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)
        t0 = time.time()
        with _sae_progress() as progress:
            last = {"t": 0.0}

            def tick(stage: str, done: int, total: int) -> None:
                if progress is not None:
                    progress(stage, done, total)
                elif time.time() - last["t"] > 10 or done == total:
                    last["t"] = time.time()
                    err.print(f"[{time.time() - t0:7.1f}s] {stage} {done}/{total}", highlight=False)

            result = run_attack(pipe, concept, atk, patch=patches, seeds=seed_list, judge=judge_obj, sets=set_names,
                                force=force, seed=attack_seed, progress=tick)
        write_attack_run(result, output, overwrite=overwrite)
    except ErasekitError as e:
        _fail(e)
    from rich.table import Table

    t = Table(title=f"{result.attack} on {result.concept!r}: success (judge reads the concept), 95% intervals")
    for col in ("prompts", "n", "unedited", "pre-attack", "post-attack"):
        t.add_column(col, justify="right" if col != "prompts" else "left")

    def fmt(d: dict) -> str:
        return f"{d['value']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"

    for name, r in result.rates().items():
        t.add_row(name, str(r["n"]), fmt(r["original"]), fmt(r["pre_attack"]), fmt(r["post_attack"]))
    out.print(t)
    out.print(f"wrote {output} (attack.json, adversarial artefact, report.html; {result.cost['wall_s']:.0f}s, "
              f"{result.cost['unet_calls']} UNet calls)")


@app.command("attacks")
def attacks_cmd(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list each setting.")) -> None:
    """List the registered attacks and their settings."""
    from rich.table import Table

    from .attacks import describe

    table = Table(show_lines=verbose)
    for col in ("attack", "kind", "description", "settings (--set key=value)"
                + ("; the embedded world's where they differ" if verbose else "")):
        table.add_column(col)
    for a in describe():
        table.add_row(a["name"], a["kind"], a["description"], _settings_cell(a["config"], verbose))
    out.print(table)


@app.command()
def demo(
    concept: str = typer.Option("star", "--concept", help="World concept to erase: a shape, colour, texture or "
                                "background of the embedded world."),
    seeds: str = typer.Option("0-47", "--seeds", help="Seeds per prompt set."),
    output: Path = typer.Option(Path("erasekit-demo"), "-o", "--output", help="Run folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run folder of an earlier demo "
                                   "(only a folder erasekit wrote, holding nothing else)."),
    device: str = typer.Option("cpu", "--device", help="cpu (the README's figures) or cuda: noise comes from CPU "
                               "generators, so the figures agree up to float rounding."),
) -> None:
    """Erase a concept from the embedded world with UCE, evaluate before/after, write a report."""
    from .api import erase as erase_fn
    from .concepts import ConceptSpec
    from .evaluation import evaluate, get_judge, parse_seeds
    from .io import check_output
    from .models import load_pipeline
    from .world.vocab import CONCEPTS, UCE_WORLD, erase_templates

    try:
        check_output(output, overwrite)
        seed_list = parse_seeds(seeds)
        axis, label = get_judge().resolve(concept)
        t0 = time.time()
        with err.status("loading the embedded world model"):
            pipe = load_pipeline(None, device=device)
        spec = ConceptSpec(label, preserve=tuple(v for v in CONCEPTS[axis] if v != label))
        with err.status(f"erasing {label!r} with UCE"):
            patch = erase_fn(pipe, spec, method="uce", templates=erase_templates(axis), **UCE_WORLD)
        out.print(f"UCE erased {label!r} ({axis}) in {patch.manifest['wall_time_s']:.2f}s "
                  f"({len(patch.tensors())} K/V matrices edited)")
        with err.status(f"generating before/after images on {len(seed_list)} seeds x 4 prompt sets, templated "
                        "and paraphrased"):
            result = evaluate(pipe, [spec], patch=patch, seeds=seed_list)
        _write_run(result, output, overwrite, f"erasekit demo: erasing '{label}' with UCE",
                   extra=lambda d: patch.save(d / "patch"))
    except ErasekitError as e:
        _fail(e)
    _summary_table(result)
    out.print(f"report: {(output / 'report.html').resolve()}  (patch in {output / 'patch'}; "
              f"total {time.time() - t0:.0f}s)")


@world_app.command("train")
def world_train(
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Pipeline folder to write (the judge goes "
                                          "inside it as classifier.safetensors)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a world-model folder erasekit wrote."),
    update_shipped: bool = typer.Option(False, "--update-shipped", help="Maintainers: replace the model and judge "
                                        "shipped inside the installed package instead of writing -o."),
    seed: int = typer.Option(0, "--seed"),
    set_: list[str] = typer.Option([], "--set", help="Override a training setting, key=value (see TrainConfig)."),
) -> None:
    """Train the embedded world (judge, VAE, UNet + text encoder) from a seed, on CPU or GPU."""
    from .config import apply_overrides
    from .world.assets import classifier_path, model_path
    from .world.train import TrainConfig, train_world

    try:
        if (output is None) == (not update_shipped):
            raise InvalidInputError("name the folder to write with -o DIR (or, to replace the shipped model, "
                                    "--update-shipped without -o)")
        cfg = apply_overrides(TrainConfig(seed=seed), set_)
        dest = model_path() if update_shipped else output
        cls_dest = classifier_path() if update_shipped else None
        t0 = time.time()
        card = train_world(dest, cfg, log=lambda s: err.print(f"[{time.time() - t0:7.1f}s] {s}", highlight=False),
                           classifier_out=cls_dest, overwrite=overwrite or update_shipped, owned=update_shipped)
    except ErasekitError as e:
        _fail(e)
    out.print(f"wrote {dest}{f' and {cls_dest}' if cls_dest else ''} in {card['total_minutes']} min; "
              f"fidelity {card['fidelity_canonical']}")


@sae_app.command("train")
def sae_train(
    output: Path = typer.Option(..., "-o", "--output", help="SAE folder to write (sae.safetensors, config, record)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local folder (default: embedded world)."),
    site: str = typer.Option("unet-up-attn-0-1", "--site", help="Where the SAE reads activations, by role: "
                             "unet-up-attn-S-A (transformer A of the S-th up block with transformers; unet-up-attn-0-1 is "
                             "SAeUron's up_blocks.1.attentions.1 on SD1.x, up_blocks.0.attentions.1 on the world), "
                             "unet-down-attn-S-A, unet-mid, text-encoder-layer-N (Concept Steerers), or a module name."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="UTF-8 text, one prompt a line "
                                                "(default on the world model: --n-prompts random world captions)."),
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="World captions to generate from, without "
                                            "--prompts-file (default 200; 2000 for a text-encoder site)."),
    set_: list[str] = typer.Option([], "--set", help="SAE setting key=value (n_latents, k, batch_topk, steps, lr, ...)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run whose checkpoint is at "
                                "OUTPUT.checkpoint (same model, site, prompts and settings)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an SAE folder erasekit wrote."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Collect a site's activations (while generating, or while encoding for a text-encoder site) and train a
    TopK or BatchTopK SAE (with AuxK) on them. The run keeps a checkpoint beside -o until it ends: --resume
    continues a killed run from there."""
    from .adapters import get_adapter
    from .config import apply_overrides
    from .io import check_output, check_parent
    from .models import load_pipeline
    from .sae import SAEConfig, discard, train_sae

    try:
        check_output(output, overwrite)
        ckpt = check_parent(Path(f"{output}.checkpoint"))
        cfg = apply_overrides(SAEConfig(), set_)
        text_site = site.startswith("text")
        prompts = _sae_prompts(model, prompts_file, n_prompts if n_prompts is not None else (2000 if text_site else 200), cfg.seed)
        with err.status("loading model"):
            pipe = load_pipeline(model, device=device)
        t0 = time.time()
        with _sae_progress() as progress:
            def log(m: str) -> None:
                if progress is None:
                    err.print(f"[{time.time() - t0:7.1f}s] {m}", highlight=False)

            sae, record = train_sae(get_adapter(pipe), site, prompts, cfg, log=log,
                                    progress=progress, checkpoint=ckpt, resume=resume)
        sae.save(output, record, overwrite=overwrite)
        discard(ckpt)
    except ErasekitError as e:
        _fail(e)
    out.print(f"wrote {output}: {record['site']}, variance explained {record['fve']:.3f}, dead latents "
              f"{record['dead_fraction']:.1%}, {record['wall_time_s']:.0f}s")


class _sae_progress:
    """``with _sae_progress() as progress``: a callback drawing progress bars on a terminal, or None
    elsewhere (then progress lines are logged)."""

    def __enter__(self):
        self.bar = None
        if not err.is_terminal:
            return None
        import rich.progress as rp

        self.bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                               rp.TimeElapsedColumn(), rp.TimeRemainingColumn(), console=err)
        self.bar.__enter__()
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = self.bar.add_task({"collect": "collecting", "train": "training"}.get(stage, stage),
                                                 total=total)
            self.bar.update(tasks[stage], completed=done, total=total)

        return progress

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _sae_prompts(model: Optional[str], prompts_file: Optional[Path], n: int, seed: int) -> list[str]:
    """The prompts an SAE's activations come from: a file's lines, or world captions on the world model."""
    import random

    from .concepts import check_text
    from .world.vocab import AXES, CONCEPTS, caption

    if prompts_file is not None:
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read prompts file {prompts_file} as UTF-8 text ({type(e).__name__})") from None
        lines = [check_text(line.strip(), "a prompt") for line in text.splitlines() if line.strip()]
        if not lines:
            raise InvalidInputError(f"prompts file {prompts_file} holds no prompt; write one prompt a line")
        return lines
    if model not in (None, "", "world"):
        raise InvalidInputError("pass --prompts-file with the prompts to generate from (world captions serve only "
                                "the embedded world model)")
    if n < 1:
        raise InvalidInputError(f"--n-prompts must be at least 1 (got {n})")
    rng = random.Random(seed)
    return [caption({ax: rng.choice(list(CONCEPTS[ax])) for ax in AXES}, rng) for _ in range(n)]


@world_app.command("info")
def world_info() -> None:
    """Print the shipped world model's training record (steps, time, fidelity)."""
    from .world.assets import model_path

    f = model_path() / "training.json"
    if not f.is_file():
        _fail(ErasekitError(f"no training record at {f}; run `erasekit world train`"))
    card = json.loads(f.read_text())
    out.print_json(data={k: card[k] for k in ("unet_steps_done", "total_minutes", "fidelity_canonical",
                                               "fidelity_synonyms", "classifier", "sampling")})


#: click's error base class, wherever this typer takes click from (its own copy since typer 0.2x)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; returns the exit code. Usage errors (unknown option, a
    value of the wrong type) are one line on stderr, like every other error."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="erasekit")
    except _CLICK_ERROR as e:
        ctx, msg = getattr(e, "ctx", None), " ".join(e.format_message().split()).rstrip(".")
        if msg:  # no message: a bare group command, whose help was printed
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            _say_error(f"{msg}{hint}")
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return 130
    except OSError as e:  # a full disk, a folder that went read-only: outputs are atomic, nothing is half-written
        where = f" ({e.filename})" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            _say_error(f"could not write{where}: {e.strerror or e}; free space or choose another output path "
                       "(nothing was half-written)")
        else:  # a read failure lands here too: do not call it a write
            _say_error(f"file error{where}: {e.strerror or e}; check that path and its permissions "
                       "(no output was half-written)")
        return 2
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """Console entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
