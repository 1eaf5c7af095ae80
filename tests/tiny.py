"""Tiny random pipelines per model family (the diffusers dummy-component pattern).

They prove that code paths run for every family; they prove nothing about erasure quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erasekit.evaluation.judges import Judge
from erasekit.world.tokenizer import make_tokenizer
from erasekit.world.vocab import AXES, CONCEPTS, all_words, find_axis


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32)


def _text_config(tok, hidden: int = 32) -> dict:
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=5,
                num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                hidden_act="gelu", projection_dim=32)


def _distinct_tokens(te: torch.nn.Module) -> torch.nn.Module:
    """Random CLIP encoders map every prompt to nearly the same rows (cosine 0.95-0.99), so no
    method could tell a target from what to preserve. Wider token embeddings make prompts
    distinguishable, as a trained encoder's are."""
    with torch.no_grad():
        te.get_input_embeddings().weight.normal_(0, 1.0)
    return te


#: the UNet layout both tiny pipelines share (one plain and one cross-attention level)
_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def tiny_sd(tok_dir: Path, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tok = make_tokenizer(tok_dir, words=all_words("templates"))  # a small vocabulary: the random weights the tolerances were set on
    unet = UNet2DConditionModel(**_UNET, cross_attention_dim=32, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_distinct_tokens(CLIPTextModel(CLIPTextConfig(**_text_config(tok)))),
                                   tokenizer=tok, unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tok_dir: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok = make_tokenizer(tok_dir, words=all_words("templates"))  # a small vocabulary: the random weights the tolerances were set on
    unet = UNet2DConditionModel(**_UNET, attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
    te = _distinct_tokens(CLIPTextModel(CLIPTextConfig(**_text_config(tok))))
    te2 = _distinct_tokens(CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(tok))))
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe



class RuleJudge(Judge):
    """A judge with the world's axes and prompt sets whose reading of star is ``rule(images)``: a bool or a
    probability per image (a fixed verdict for tests on random tiny pipelines, whose images the world
    classifier would read by accident of their weights)."""

    name, version = "rule", "test"

    def __init__(self, rule):
        self.rule = rule

    def axes(self):
        return {a: list(CONCEPTS[a]) for a in AXES}

    def resolve(self, concept):
        return find_axis(concept)

    def prompt_sets(self, spec, axis, label, n, *, seed=0, unrelated=None):
        from erasekit.evaluation.prompts import world_prompt_sets

        return world_prompt_sets(spec, axis, label, n, seed)

    def probs(self, images):
        prob = torch.as_tensor(np.asarray(self.rule(images), dtype=np.float32))
        out = {}
        for axis, labels in self.axes().items():
            p = torch.zeros(len(images), len(labels))
            p[:, 0] = 1.0
            if axis == "shape":
                k = labels.index("star")
                p[:, 0], p[:, k] = 1 - prob, prob
            out[axis] = p
        return out


def uce_edit(pipe):
    """UCE on "star" with its published defaults: the weight edit the attack tests attack."""
    import erasekit
    from erasekit.adapters import get_adapter
    from erasekit.methods import get_method

    return get_method("uce")().fit(get_adapter(pipe), [erasekit.ConceptSpec("star")])


def assert_replays(pipe, edit, adversarial, result, sampling: dict, n: int = 2) -> None:
    """Regenerating the first ``n`` attacked prompts with ``adversarial`` (an artefact read back from
    disk) under ``edit`` gives the attack's images bit for bit; the pipeline is left as it was."""
    from erasekit.generate import generate

    edit.apply(pipe)
    try:
        for i in range(n):
            im = generate(pipe, adversarial.prompts[i], n=1, seed=adversarial.seeds[i], adversarial=adversarial,
                          **sampling)[0]
            assert np.array_equal(np.asarray(im), result.attacked_images[i]), i
    finally:
        edit.revert(pipe)
