"""Train the embedded world from a seed: judge classifier, VAE, then UNet + text encoder.

The result is a plain diffusers ``StableDiffusionPipeline`` folder (``AutoencoderKL``,
``UNet2DConditionModel`` with cross-attention, ``CLIPTextModel``, ``CLIPTokenizer`` built from
the world vocabulary, ``DDIMScheduler``) plus the classifier's safetensors and a model card.

Recipe notes (see the model card for measured figures):
- v-prediction with a cosine schedule (alpha_bar_T ~ 0, so sampling from pure noise matches
  training), plain v-MSE (min-SNR weighting is available but slowed conditioning), EMA weights
  for sampling.
- the text encoder is trained jointly from token embeddings of std 1 (CLIP's 0.02 left words
  nearly indistinguishable) with a 20-token context; synonyms appear in captions at random, so
  they come to share geometry in the K/V input space. (An auxiliary MSE pulling synonym captions
  together exists but is off: it collapsed the encoder to a constant.)
- 10 % of the full (shape, colour, texture, background) combinations are never rendered for
  training: fidelity is measured on those prompts.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import evaluate_classifier, save_classifier, to_input, train_classifier
from .render import render_batch
from .tokenizer import build_vocab, make_tokenizer, write_tokenizer_files
from .vocab import AXES, CONCEPTS, TEMPLATES, Labels, all_words, caption, grammar_templates

SAMPLING_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 2.0}
# Context length of the world's text encoder. The longest world caption is 16 tokens; CLIP's 77
# would leave ~60 padding positions, which the 77-token model filled with the background. A short
# context is also ~30% cheaper per step. (Alone it did not make colour or shape learnable: the
# initial token embeddings did, see ``token_init_std``.)
MAX_TOKENS = 20


@dataclass
class TrainConfig:
    """Every knob of ``erasekit world train``. The defaults train a world model from a seed (judge and VAE
    included); the shipped one came from four stages of these settings, which its model card lists."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    pool: int = field(default=30000, metadata={"min": 1, "help": "rendered training images"})
    classifier_steps: int = field(default=1200, metadata={"min": 1, "help": "judge training steps"})
    vae_steps: int = field(default=700, metadata={"min": 1, "help": "VAE training steps"})
    unet_steps: int = field(default=10000, metadata={"min": 1, "help": "UNet + text encoder steps"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "UNet batch size"})
    lr: float = field(default=5e-4, metadata={"above": 0.0, "help": "UNet/text-encoder peak learning rate"})
    drop_axis_p: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0, "help": "chance an axis is left out of a caption"})
    synonym_p: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "help": "chance a word is replaced by a synonym"})
    uncond_p: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "empty-caption rate (for guidance)"})
    synonym_loss: float = field(default=0.0, metadata={"min": 0.0,
        "help": "weight of an MSE pulling synonym captions' embeddings together (0: off; it can collapse the "
                "text encoder to a constant, see the model card)"})
    te_lr: float = field(default=2e-4, metadata={"min": 0.0, "help": "text-encoder peak learning rate"})
    probe_every: int = field(default=600, metadata={"min": 1, "help": "steps between fidelity probes"})
    first_probe: int = field(default=300, metadata={"min": 1, "help": "step of the first probe (catches a broken run early)"})
    probe_images: int = field(default=32, metadata={"min": 1, "help": "images per fidelity probe"})
    final_eval_images: int = field(default=64, metadata={"min": 1, "help": "images of the closing fidelity check "
                                                                     "(benchmarks/world_fidelity.py measures 500+)"})
    min_snr_gamma: float = field(default=0.0, metadata={"min": 0.0,
        "help": "min-SNR loss weighting (0 = off: plain v-prediction MSE, which keeps weight on the high-noise "
                "steps where the prompt decides colour, shape and background)"})
    reuse_classifier: str = field(default="", metadata={"help": "load this judge instead of training one"})
    reuse_vae: str = field(default="", metadata={"help": "load this VAE folder instead of training one"})
    init_from: str = field(default="", metadata={
        "help": "continue training: start the UNet and text encoder from this world pipeline folder (one "
                "`world train` wrote, with this grammar's tokenizer) instead of from random weights; the "
                "schedule (warm-up, cosine from lr) restarts, so lower lr and te_lr for a continuation"})
    max_minutes: float = field(default=115.0, metadata={"above": 0.0, "help": "stop UNet training early past this"})
    threads: int = field(default=2, metadata={"min": 1, "help": "torch CPU threads (and render processes)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the UNet and text encoder (CUDA graphs on a GPU, where this tiny model is otherwise "
                "bound by Python overhead at ~0.11 s/step); same maths, fewer launches"})
    device: str = field(default="cpu", metadata={
        "help": "cpu, cuda or auto (cuda when present). Batches and noise come from CPU generators either way, "
                "so a GPU run follows the CPU recipe step for step (up to float rounding)"})
    grammar: str = field(default="broad", metadata={
        "help": "caption grammar: broad (BROAD_TEMPLATES, the shipped model's: 43 templates with requests, "
                "questions, clauses; disjoint from the paraphrase family) or templates (the 7 templates of "
                "erasekit's first world model)",
        "choices": ("templates", "broad")})
    token_init_std: float = field(default=1.0, metadata={"above": 0.0, 
        "help": "std of the text encoder's initial token embeddings (CLIP's 0.02 leaves all words nearly alike: "
                "only the background got told apart, colour and shape stayed at chance)"})


def unet_config() -> dict:
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 128, 128),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                # diffusers reads ``attention_head_dim`` as the number of heads (a historical misnaming):
                # 4 heads of 32 dims. The earlier value 32 gave 32 heads of 4 dims, too narrow to pick
                # out one word: the UNet read the background and drew colour and shape from the seed.
                cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                mid_block_add_attention=False)


def text_config(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                projection_dim=128, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def scheduler_kwargs() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                prediction_type="v_prediction", clip_sample=False)


def all_combos() -> list[Labels]:
    return [Labels(*c) for c in itertools.product(*(list(CONCEPTS[a]) for a in AXES))]


def is_heldout(labels: Labels) -> bool:
    """10 % of full combinations, fixed by hash: never rendered for training."""
    key = repr(labels.index()).encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % 10 == 0


def heldout_combos() -> list[Labels]:
    return [c for c in all_combos() if is_heldout(c)]


def fidelity_prompts(n: int, seed: int, synonyms: bool = False, family: str = "templates") -> list[tuple[str, Labels]]:
    """``n`` prompts over held-out combinations naming all four axes (canonical or synonym words), in
    the training templates (``family="templates"``) or the paraphrase family's frames
    (``"paraphrase"``, :mod:`erasekit.evaluation.paraphrase`: phrasings no training caption uses)."""
    if family == "paraphrase":  # the templated prompts' combinations, asked for in paraphrase frames
        from ..evaluation.paraphrase import FRAMES, paraphrase

        wrng = random.Random(f"paraphrase-{seed}")
        out = []
        for i, (_, lab) in enumerate(fidelity_prompts(n, seed, synonyms)):
            words = {a: (wrng.choice(CONCEPTS[a][v]) if synonyms else v) for a, v in lab.as_dict().items()}
            out.append((paraphrase(words, i % len(FRAMES)), lab))
        return out
    rng = random.Random(seed)
    combos = heldout_combos()
    out = []
    for i in range(n):
        lab = combos[rng.randrange(len(combos))]
        out.append((caption(lab, rng, template=i % len(TEMPLATES), synonym_p=1.0 if synonyms else 0.0), lab))
    return out


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], batch_size: int = 64,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W), one per (prompt, seed), batched."""
    from ..adapters import get_adapter

    steps = num_inference_steps or SAMPLING_DEFAULTS["num_inference_steps"]
    g = SAMPLING_DEFAULTS["guidance_scale"] if guidance_scale is None else guidance_scale
    outs = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]
        img = get_adapter(pipe).sample(ps, gens, steps, g, output_type="pt")  # erasekit's loop: applied edits act
        outs.append(img.cpu() * 2 - 1)
    return torch.cat(outs)


@torch.no_grad()
def fidelity(pipe, classifier, n: int, seed: int = 777, synonyms: bool = False, batch_size: int = 64,
             grid_path: str | Path | None = None, family: str = "templates", **sampling) -> dict[str, float]:
    """Share of generated images whose classifier argmax agrees with the prompt, per axis."""
    items = fidelity_prompts(n, seed, synonyms, family)
    imgs = generate_images(pipe, [p for p, _ in items], [10_000_000 + seed * 10_000 + i for i in range(n)],
                           batch_size=batch_size, **sampling)
    if grid_path is not None:
        from PIL import Image

        arr = ((imgs[:32].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        rows = [np.concatenate(list(arr[i:i + 8]), axis=1) for i in range(0, len(arr) - len(arr) % 8, 8)]
        if rows:
            from ..io import atomic_path

            with atomic_path(grid_path) as tmp:
                Image.fromarray(np.concatenate(rows, axis=0)).resize((8 * 96, len(rows) * 96),
                                                                    Image.NEAREST).save(tmp, format="PNG")
    probs = classifier.predict_proba(imgs)
    target = torch.tensor([lab.index() for _, lab in items])
    return {a: float((probs[a].argmax(-1) == target[:, i]).float().mean()) for i, a in enumerate(AXES)}


def train_vae(x: torch.Tensor, steps: int, seed: int, log, device: str = "cpu") -> "AutoencoderKL":  # noqa: F821
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config()).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        xb = x[idx].to(device)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / xb[0].numel()
        loss = F.mse_loss(rec, xb) + F.l1_loss(rec, xb) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    return vae.eval()


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(**scheduler_kwargs(), timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_device(name: str) -> str:
    """'auto' -> cuda when present; a cuda request without a GPU is a one-line error."""
    from ..errors import ErasekitError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ErasekitError(f"device={name} asked for, but torch sees no GPU; use --set device=cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ErasekitError(f"unknown device {name!r}; use cpu, cuda or auto")
    return name


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def train_world(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print,
                classifier_out: str | Path | None = None, overwrite: bool = False, owned: bool = False) -> dict:
    """Train everything and write a diffusers pipeline folder to ``out_dir`` (the judge goes inside
    it as ``classifier.safetensors`` unless ``classifier_out`` names another file); returns the card.

    Nothing is written outside ``out_dir`` except ``classifier_out`` when given; ``out_dir`` is
    written at the end, atomically, and replaces an existing folder only with ``overwrite`` and
    only a folder erasekit wrote (or, with ``owned``, the shipped assets). Intermediate files (the judge, VAE, EMA checkpoints, probe
    grids) live in a scratch folder that a failed run keeps and names in its log."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tempfile

    from ..io import atomic_dir, check_output, check_parent

    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t_start = time.time()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite, owned)  # fail now, not after hours of training
    if cfg.init_from:
        _check_init(Path(cfg.init_from), cfg.grammar)
    if classifier_out is not None:
        classifier_out = Path(classifier_out)
        check_parent(classifier_out)

    # 1. the judge
    t0 = time.time()
    if cfg.reuse_classifier:
        from .classifier import load_classifier

        classifier = load_classifier(cfg.reuse_classifier)
        creport = evaluate_classifier(classifier, n=2000, seed=cfg.seed + 4)
        log(f"reusing the judge at {cfg.reuse_classifier}")
    else:
        classifier, creport = train_classifier(steps=cfg.classifier_steps, seed=cfg.seed, log=log, device=device,
                                               workers=cfg.threads)
    classifier.to(device)
    for p in classifier.parameters():
        p.requires_grad_(False)
    timings["classifier_s"] = time.time() - t0
    log(f"classifier accuracy {creport.accuracy} ece {creport.ece}")
    work = Path(tempfile.mkdtemp(prefix="erasekit-train-"))
    save_classifier(classifier, work / "classifier.safetensors")  # kept in the scratch folder if a later stage fails

    # 2. training pool (held-out combinations excluded) and the VAE
    t0 = time.time()
    rng = random.Random(cfg.seed + 10)
    combos = [c for c in all_combos() if not is_heldout(c)]
    pool_labels = [combos[rng.randrange(len(combos))] for _ in range(cfg.pool)]
    pool = to_input(render_batch(pool_labels, [50_000_000 + i for i in range(cfg.pool)], workers=cfg.threads))
    timings["render_s"] = time.time() - t0
    log(f"rendered {cfg.pool} training images in {timings['render_s']:.0f}s")
    t0 = time.time()
    if cfg.reuse_vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.reuse_vae).to(device).eval()
        log(f"reusing the VAE at {cfg.reuse_vae}")
    else:
        vae = train_vae(pool, cfg.vae_steps, cfg.seed + 11, log, device=device)
    for p in vae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(pool[i:i + 500].to(device)).latent_dist.mean for i in range(0, len(pool), 500)])
        rec = vae.decode(lat[:512]).sample.clamp(-1, 1).cpu()
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    lat = lat * scaling
    cls_rec = classifier.predict_proba(rec)
    y_rec = torch.tensor([lab.index() for lab in pool_labels[:512]])
    vae_acc = {a: float((cls_rec[a].argmax(-1) == y_rec[:, i]).float().mean()) for i, a in enumerate(AXES)}
    timings["vae_s"] = time.time() - t0
    log(f"vae scaling {scaling:.4f}; classifier on reconstructions {vae_acc}")
    vae.save_pretrained(work / "vae")
    log(f"saved the judge to {work / 'classifier.safetensors'} and the VAE to {work / 'vae'}")
    del pool

    # 3. UNet + text encoder
    t0 = time.time()
    tok_dir = work / "tokenizer"
    tokenizer = make_tokenizer(tok_dir, model_max_length=MAX_TOKENS, words=all_words(cfg.grammar))
    torch.manual_seed(cfg.seed + 20)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
    with torch.no_grad():  # distinct words from step 0, so the UNet can read every axis (see TrainConfig)
        text_encoder.get_input_embeddings().weight.normal_(0.0, cfg.token_init_std)
    unet = UNet2DConditionModel(**unet_config())
    if cfg.init_from:  # continue from a finished run (checked above: same architecture and words)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet").state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(Path(cfg.init_from) / "text_encoder").state_dict())
        log(f"starting the UNet and text encoder from {cfg.init_from}")
    text_encoder.to(device)
    unet.to(device)
    noise_sched = DDPMScheduler(**scheduler_kwargs())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": cfg.lr},
                             {"params": list(text_encoder.parameters()), "lr": cfg.te_lr}], weight_decay=1e-2,
                            fused=device.startswith("cuda"))
    unet_fwd, te_fwd = unet, text_encoder
    if cfg.compile:
        mode = "reduce-overhead" if device.startswith("cuda") else None
        unet_fwd = torch.compile(unet, mode=mode, dynamic=False)
        te_fwd = torch.compile(text_encoder, mode=mode, dynamic=False)
    warm = 200

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, cfg.unet_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in itertools.chain(ema_unet.parameters(), ema_te.parameters()):
        p.requires_grad_(False)
    ema_params = list(itertools.chain(ema_unet.parameters(), ema_te.parameters()))
    live_params = list(itertools.chain(unet.parameters(), text_encoder.parameters()))
    alphas = noise_sched.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 21)
    crng = random.Random(cfg.seed + 22)

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        return te_fwd(ids.to(device)).last_hidden_state

    probes: list[dict] = []
    step = 0
    stopped_early = False
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(lat), (cfg.batch_size,), generator=gen)
        texts = []
        for j in idx.tolist():
            if crng.random() < cfg.uncond_p:
                texts.append("")
            else:
                texts.append(caption(pool_labels[j], crng, synonym_p=cfg.synonym_p, drop_p=cfg.drop_axis_p,
                                     grammar=cfg.grammar))
        # synonym alignment pairs: same template and dropped axes, canonical vs synonym words
        n_pairs = 8 if cfg.synonym_loss > 0 else 0
        canon, syn = [], []
        for j in idx[:n_pairs].tolist():
            d = {a: (None if crng.random() < cfg.drop_axis_p else v) for a, v in pool_labels[j].as_dict().items()}
            if d["shape"] is None:
                d["shape"] = pool_labels[j].shape
            tpl = crng.randrange(len(grammar_templates(cfg.grammar)))
            canon.append(caption(d, random.Random(0), template=tpl, synonym_p=0.0, grammar=cfg.grammar))
            syn.append(caption(d, crng, template=tpl, synonym_p=1.0, grammar=cfg.grammar))
        h_all = encode(texts + canon + syn)
        h = h_all[:cfg.batch_size]
        hc, hs = h_all[cfg.batch_size:cfg.batch_size + n_pairs], h_all[cfg.batch_size + n_pairs:]
        x0 = lat[idx.to(device)]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(device)
        xt = noise_sched.add_noise(x0, noise, t)
        v = noise_sched.get_velocity(x0, noise, t)
        pred = unet_fwd(xt, t, h).sample
        if cfg.min_snr_gamma > 0:
            w = (snr[t].clamp(max=cfg.min_snr_gamma) / (snr[t] + 1)).view(-1, 1, 1, 1)
            loss_d = (w * (pred - v) ** 2).mean() / w.mean()
        else:
            loss_d = F.mse_loss(pred, v)
        loss_s = F.mse_loss(hs, hc) if n_pairs else torch.zeros(())
        loss = loss_d + cfg.synonym_loss * loss_s
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        if step % 100 == 0:
            el = time.time() - t0
            with torch.no_grad():  # collapse check: how alike are different captions' embeddings?
                flat = F.normalize(h.detach().flatten(1), dim=-1)
                sim = (flat @ flat.T)[~torch.eye(len(flat), dtype=torch.bool)].mean()
            log(f"unet step {step}/{cfg.unet_steps} loss {loss_d.item():.4f} syn {loss_s.item():.4f} "
                f"caption cos {sim.item():.3f} {el:.0f}s ({el / (step + 1):.2f}s/step)")
        if step + 1 == cfg.first_probe or (step + 1) % cfg.probe_every == 0 or step == cfg.unet_steps - 1:
            pipe = build_pipeline(vae, ema_te, tokenizer, ema_unet)
            fid = fidelity(pipe, classifier, cfg.probe_images, seed=1, grid_path=work / f"probe-{step + 1}.png")
            probes.append({"step": step + 1, "minutes": (time.time() - t_start) / 60, **fid})
            _save_checkpoint(pipe, work / "checkpoint")  # survives a kill, even one during this save
            log(f"probe step {step + 1}: " + " ".join(f"{a} {v:.2f}" for a, v in fid.items())
                + f" (grid: {work / f'probe-{step + 1}.png'}; EMA checkpoint: {work / 'checkpoint'})")
        if (time.time() - t_start) / 60 > cfg.max_minutes:
            log(f"stopping at step {step + 1}: time budget of {cfg.max_minutes} min reached")
            stopped_early = True
            break
    timings["unet_s"] = time.time() - t0

    # 4. closing check and save
    t0 = time.time()
    pipe = build_pipeline(vae, ema_te, tokenizer, ema_unet)
    final = fidelity(pipe, classifier, cfg.final_eval_images, seed=2)
    final_syn = fidelity(pipe, classifier, cfg.final_eval_images, seed=2, synonyms=True)
    timings["final_eval_s"] = time.time() - t0
    card = {
        "command": reproduce_command(cfg),
        "config": asdict(cfg),
        "unet_steps_done": step + 1,
        "stopped_early": stopped_early,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_minutes": round((time.time() - t_start) / 60, 1),
        "torch_threads": cfg.threads,
        "device": device_name(device),
        "classifier": {"accuracy": creport.accuracy, "ece": creport.ece, "temperature": creport.temperature},
        "reused": {"classifier": cfg.reuse_classifier, "vae": cfg.reuse_vae},
        "init_from": cfg.init_from and _init_record(Path(cfg.init_from)),
        "classifier_on_vae_reconstructions": vae_acc,
        "probes": probes,
        "fidelity_canonical": final,
        "fidelity_synonyms": final_syn,
        "fidelity_images": cfg.final_eval_images,
        "sampling": SAMPLING_DEFAULTS,
    }
    log(f"final fidelity {final}; synonyms {final_syn}")
    pipe.to("cpu")
    # --update-shipped: the judge is swapped as the model's atomic write's last step, and put back if that write
    # fails or is interrupted (a SIGKILL between the two renames is the one window left)
    old_judge = Path(classifier_out).read_bytes() if classifier_out is not None and Path(classifier_out).is_file() \
        else None
    try:
        _write_world(pipe, out_dir, work, cfg, card, classifier_out, overwrite, owned)
    except BaseException:
        if classifier_out is not None and (work / ".judge-swapping").exists():
            from ..io import atomic_path

            now = Path(classifier_out).read_bytes() if Path(classifier_out).is_file() else None
            if now != old_judge:
                if old_judge is None:
                    Path(classifier_out).unlink(missing_ok=True)
                else:
                    with atomic_path(classifier_out) as tmp_file:
                        tmp_file.write_bytes(old_judge)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return card


def _write_world(pipe: Any, out_dir: str | Path, work: Path, cfg: TrainConfig, card: dict,
                 classifier_out: str | Path | None,
                 overwrite: bool, owned: bool) -> None:
    """The pipeline folder, written atomically; with ``classifier_out`` the judge is replaced there as the
    folder's last write (``work/.judge-swapping``, made first, tells the caller to check and restore it)."""
    from ..io import atomic_dir

    with atomic_dir(out_dir, overwrite=overwrite, owned=owned) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for cfg_file in tmp.glob("*/config.json"):  # a reused VAE remembers the scratch folder it came from
            conf = json.loads(cfg_file.read_text())
            if conf.pop("_name_or_path", None) is not None:
                cfg_file.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        write_tokenizer_files(tmp / "tokenizer", all_words(cfg.grammar))  # the words the text encoder learned
        (tmp / "erasekit.json").write_text(json.dumps({"world": True, "sampling": SAMPLING_DEFAULTS,
                                                       "image_size": 32}, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(card))
        if classifier_out is None:
            shutil.copyfile(work / "classifier.safetensors", tmp / "classifier.safetensors")
        else:
            from ..io import atomic_path

            (work / ".judge-swapping").touch()
            with atomic_path(classifier_out) as tmp_file:
                shutil.copyfile(work / "classifier.safetensors", tmp_file)


def _save_checkpoint(pipe: Any, dest: Path) -> None:
    """Save a probe's EMA pipeline beside ``dest`` and swap it in, so a kill mid-save keeps the last one."""
    new, old = dest.with_name(dest.name + ".new"), dest.with_name(dest.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    pipe.save_pretrained(new, safe_serialization=True)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _check_init(folder: Path, grammar: str) -> None:
    """``init_from`` must be a world pipeline of this recipe's architecture whose tokenizer has exactly the
    grammar's words (the text encoder's rows are those words' ids); one line otherwise."""
    from ..errors import InvalidInputError

    if not (folder / "unet" / "config.json").is_file() or not (folder / "text_encoder").is_dir():
        raise InvalidInputError(f"init_from={folder} is not a world pipeline folder (no unet/ and text_encoder/); "
                                "pass a folder `erasekit world train` wrote")
    conf = json.loads((folder / "unet" / "config.json").read_text())
    if any(conf.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in unet_config().items()):
        raise InvalidInputError(f"init_from={folder} has another UNet architecture than this recipe's; "
                                "pass a world model folder")
    want = build_vocab(all_words(grammar))[0]
    vocab_file, fast_file = folder / "tokenizer" / "vocab.json", folder / "tokenizer" / "tokenizer.json"
    if vocab_file.is_file():
        have = json.loads(vocab_file.read_text())
    else:  # a probe's EMA checkpoint: save_pretrained writes only the fast tokenizer's file
        have = json.loads(fast_file.read_text()).get("model", {}).get("vocab") if fast_file.is_file() else None
    if have != want:
        raise InvalidInputError(f"init_from={folder} learned other words than grammar={grammar}'s; "
                                "pass a model trained with the same --set grammar")


def _init_record(folder: Path) -> dict:
    """What a continued run started from: the folder and its own training record's command and steps."""
    rec = folder / "training.json"
    prev = json.loads(rec.read_text()) if rec.is_file() else {}
    return {"folder": str(folder), "command": prev.get("command"), "unet_steps_done": prev.get("unet_steps_done")}


def reproduce_command(cfg: TrainConfig) -> str:
    """The CLI line that reruns this training: the non-default settings as ``--set key=value``."""
    default = TrainConfig()
    parts = ["erasekit world train -o world-model"] + ([f"--seed {cfg.seed}"] if cfg.seed != default.seed else [])
    for k, v in asdict(cfg).items():
        if k != "seed" and v != getattr(default, k):
            parts.append(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}")
    return " ".join(parts)


def model_card(card: dict) -> str:
    """Markdown model card from the training record."""
    f, fs = card["fidelity_canonical"], card["fidelity_synonyms"]
    rows = "\n".join(f"| {a} | {f[a]:.3f} | {fs[a]:.3f} |" for a in AXES)
    probes = "\n".join(f"| {p['step']} | {p['minutes']:.1f} | " + " | ".join(f"{p[a]:.2f}" for a in AXES) + " |"
                       for p in card["probes"])
    acc = card["classifier"]["accuracy"]
    stages = card.get("stages") or []
    recipe = ("\n## Recipe: every stage\nEach stage continues the previous one's folder (`init_from`); the first "
              "reuses the shipped judge and VAE, which do not depend on the caption grammar.\n\n"
              "| stage | command | UNet steps | minutes |\n|---|---|---|---|\n"
              + "\n".join(f"| {i + 1} | `{st['command']}` | {st['unet_steps']} | {st['minutes']} |"
                          for i, st in enumerate(stages)) + "\n") if stages else ""
    return f"""# erasekit embedded world model

A small text-to-image diffusion model of the procedural shapes world of `erasekit.world`,
saved as a diffusers `StableDiffusionPipeline` (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel, CLIPTokenizer, DDIMScheduler). 32x32 RGB images, 16x16x4
latents, v-prediction, cosine schedule. Sample with {card['sampling']['num_inference_steps']}
steps and guidance {card['sampling']['guidance_scale']} (higher guidance over-saturates).

Reproduce: `{card['command']}` (seed {card['config']['seed']}), {card['unet_steps_done']} UNet steps,
{card['total_minutes']} min in total on {card.get('device', 'cpu')} ({card['torch_threads']} torch CPU threads)
(timings: {card['timings_s']}). Batches, noise and timesteps come from CPU generators on every
device, so the command without its device settings follows the same steps on a CPU, up to float
rounding.
{recipe}
## Fidelity (classifier agrees with the prompt; {card['fidelity_images']} images of held-out combinations)
| axis | canonical words | synonyms |
|---|---|---|
{rows}

## Fidelity during training (probes of {card['config']['probe_images']} images)
| step | minutes | {' | '.join(AXES)} |
|---|---|{'---|' * len(AXES)}
{probes}

## Judge classifier (held-out renders)
Accuracy: {', '.join(f'{a} {v:.4f}' for a, v in acc.items())}.
`benchmarks/world_fidelity.py` re-measures fidelity on 500+ images.

## Limitations
- A toy: 32x32 images of one object, a 4-layer 128-d text encoder that knows only the world's
  {len(CONCEPTS['shape']) + len(CONCEPTS['colour']) + len(CONCEPTS['texture']) + len(CONCEPTS['background'])} concepts, their synonyms and template words; other words fall back to characters.
- The text context is {MAX_TOKENS} tokens, not CLIP's 77: longer prompts are truncated.
- The text encoder starts from token embeddings of std {card['config'].get('token_init_std', 0.02)}, not CLIP's 0.02: with 0.02, an
  earlier model told backgrounds apart (embedding distance ~19) but hardly colours (~2.5) or
  shapes (~0.8), and drew colour and shape from the seed, not the prompt.
- 10% of the (shape, colour, texture, background) combinations were never rendered for training;
  the fidelity above is measured on exactly those prompts.
{reused_note(card)}"""


def reused_note(card: dict) -> str:
    r = card.get("reused") or {}
    note = ""
    if r.get("classifier") or r.get("vae"):
        note += ("- This run reused the judge and VAE of an earlier run with the same seed (the judge and VAE do "
                 f"not depend on the caption grammar; classifier: {bool(r.get('classifier'))}, VAE: "
                 f"{bool(r.get('vae'))}), so its total time leaves out their training (see that run's log).\n")
    init = card.get("init_from")
    if init:
        start = (f"{init.get('unet_steps_done')} UNet steps of `{init.get('command')}`" if init.get("command")
                 else f"the weights in {init.get('folder')} (a checkpoint without a training record)")
        note += (f"- This run continued training from {start}: {card['unet_steps_done']} steps more, the "
                 "schedule restarted at the command's lr; the total time is this run's only.\n")
    return note
