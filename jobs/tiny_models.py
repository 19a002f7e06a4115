"""Tiny, randomly initialised diffusers checkpoints for offline tests.

The checkpoints built here are structurally complete (every component a real
checkpoint has, saved in the same layout as ``save_pretrained`` writes), so
code under test loads them through the ordinary ``from_pretrained`` path.
Their weights are random, so the images they produce are noise; what matters
is that shapes, configs and file layout match the real models closely enough
to exercise the pipeline code, in well under a second per call on a CPU.
``lora-sd`` is not a checkpoint but a LoRA adapter for ``sd-img2img``'s UNet,
saved as the single safetensors file that ``load_lora_weights`` reads;
``ip-adapter-sd`` an IP-Adapter for that UNet, in the layout ``load_ip_adapter`` reads.
:data:`REAL_LAYOUT_NAMES`, built only when named, reproduce the file layouts
real checkpoints ship in (safety checker, fp16 variant, pickle beside
safetensors, shards).

Nothing is downloaded: the CLIP tokenizer is assembled from a byte-level
vocabulary written on the fly.

Heavy imports (torch, diffusers, transformers) happen inside the functions so
that importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

TINY_MODEL_NAMES = (
    "sd-img2img",
    "sd-inpainting",
    "controlnet-canny",
    "sd-x4-upscaler",
    "sd-latent-x2-upscaler",
    "ldm-super-resolution",
    "sdxl-img2img",
    "controlnet-sdxl-canny",
    "lora-sd",
    "sd-instruct-pix2pix",
    "ip-adapter-sd",
    "t2i-adapter-canny",
    "depth-dpt",
    "seg-segformer",
    "pose-vitpose",
    "sd3-img2img",
    "flux-img2img",
)

# Layouts real checkpoints ship in, built on request (not by default): Stable
# Diffusion 1.5 with its safety checker and feature extractor, fp16 variant
# files beside the plain ones, pickle weights beside safetensors ones, and
# sharded safetensors with an index. Each is sd-img2img's architecture; where
# a layout holds two sets of weights, the plain safetensors are sd-img2img's
# own (same seed) and the other set is built from seed + 1, so a test can tell
# which set was loaded from the output bytes.
REAL_LAYOUT_NAMES = (
    "sd15-safety-checker",
    "sd-fp16-variant",
    "sd-bin-beside-safetensors",
    "sd-sharded",
)

# The file name diffusers' load_lora_weights looks for by default.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The file name of the tiny IP-Adapter's weights (diffusers' single-file layout).
IP_ADAPTER_WEIGHT_NAME = "ip_adapter.safetensors"

# Files whose presence means a directory already holds a finished model.
# Pipelines write model_index.json, single models (the ControlNets)
# config.json, a LoRA adapter is its one weights file and an IP-Adapter its
# weights file beside image_encoder/.
_MARKER_FILES = ("model_index.json", "config.json", LORA_WEIGHT_NAME, IP_ADAPTER_WEIGHT_NAME)

# Pickle-based weight formats that must never appear: the project loads with
# use_safetensors=True and an unexpected .bin would hide a loading bug.
_FORBIDDEN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Real CLIP text encoders see 77 positions; prompts are padded/truncated to it.
_CLIP_MAX_LENGTH = 77
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"

# Width of the tiny CLIP text encoder, shared by the UNets' cross-attention.
_TEXT_HIDDEN_SIZE = 32

# Stable Diffusion's latent space is 8x smaller than pixel space; the tiny
# VAE keeps that ratio so callers' size arithmetic matches the real model.
SD_VAE_SCALE_FACTOR = 8
# The x4 upscaler's VAE decodes 4x; the pipeline's x4 upscaling depends on it.
UPSCALER_VAE_SCALE_FACTOR = 4
# The LDM super-resolution pipeline denoises at the input's resolution and
# its VQ decoder alone does the upscaling, so this factor is the upscale.
LDM_VQ_SCALE_FACTOR = 4


def make_tiny_models(
    directory: str | os.PathLike,
    names: Iterable[str] = TINY_MODEL_NAMES,
    seed: int = 0,
) -> dict[str, pathlib.Path]:
    """Build and save each named tiny model under ``directory/NAME``.

    Args:
        directory: Parent directory; created if missing.
        names: Any of :data:`TINY_MODEL_NAMES`. A bare string is taken as a
            single name.
        seed: Torch seed used before building each component, so the same
            seed always yields byte-identical weights.

    Returns:
        Mapping of model name to the directory holding it.

    A model whose directory already holds a ``model_index.json``, a
    ``config.json`` or (for a LoRA adapter) :data:`LORA_WEIGHT_NAME` is left
    as it is, whatever seed built it, which makes repeated calls cheap. Each
    model is written to a staging directory and renamed into place, so an
    interrupted build never leaves a directory that looks finished.

    Raises:
        ValueError: An unknown model name was requested.
        FileExistsError: A target directory exists, is not empty and does not
            hold a finished model.
    """
    if isinstance(names, str):
        names = (names,)
    requested = list(dict.fromkeys(names))
    unknown = [name for name in requested if name not in _BUILDERS]
    if unknown:
        known = list(TINY_MODEL_NAMES + REAL_LAYOUT_NAMES)
        raise ValueError(f"unknown tiny model name(s) {unknown}; known names are {known}")

    root = pathlib.Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)

    paths: dict[str, pathlib.Path] = {}
    for name in requested:
        target = root / name
        if _is_finished(target):
            logger.debug("tiny model %s already present at %s", name, target)
        else:
            _build_into(target, _BUILDERS[name], seed)
        paths[name] = target
    return paths


def _is_finished(path: pathlib.Path) -> bool:
    return any((path / marker).is_file() for marker in _MARKER_FILES)


def _build_into(target: pathlib.Path, builder: Callable[[pathlib.Path, int], None], seed: int) -> None:
    # Staging lives next to the target so the final rename stays on one
    # filesystem and is atomic.
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        logger.info("building tiny model %s (seed %d)", target.name, seed)
        builder(staging, seed)
        _check_safetensors_only(staging, pickle_allowed=target.name in _PICKLE_BESIDE_SAFETENSORS)
        try:
            # rename() replaces a missing or empty directory atomically.
            staging.rename(target)
        except OSError as exc:
            if _is_finished(target):
                # Another process finished the same model first; theirs is
                # equivalent, so keep it.
                logger.info(
                    "tiny model %s was built concurrently; keeping existing copy",
                    target.name,
                )
                return
            raise FileExistsError(f"{target} exists and does not hold a finished model; remove it and retry") from exc
        logger.info("saved tiny model %s to %s", target.name, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _check_safetensors_only(path: pathlib.Path, pickle_allowed: bool = False) -> None:
    unsafe = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in _FORBIDDEN_WEIGHT_SUFFIXES)
    if unsafe and not pickle_allowed:
        raise RuntimeError(f"non-safetensors weight files were written to {path}: {unsafe}")
    if not any(path.rglob("*.safetensors")):
        raise RuntimeError(f"no .safetensors weights were written to {path}")


def _seeded(seed: int, factory: Callable[[], Any]) -> Any:
    """Run ``factory`` with torch's CPU generator seeded to ``seed``.

    The caller's global RNG state is left untouched.
    """
    import torch

    # fork_rng restores the global generator afterwards, so building models
    # does not perturb whatever randomness the caller relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


# --------------------------------------------------------------------------
# Tokenizer and text encoder
# --------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP table of printable characters standing in for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
        + list(
            range(
                ord("\N{REGISTERED SIGN}"),
                ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1,
            )
        )
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _tokenizer_vocab() -> dict[str, int]:
    # Every byte symbol, alone and as a word ending, so that any UTF-8 text
    # tokenizes without unknown tokens even though there are no merges.
    symbols = _bytes_to_unicode()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [_BOS_TOKEN, _EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _make_tokenizer():
    """An offline byte-level CLIP tokenizer with CLIP's special tokens.

    Prompts are padded and truncated to CLIP's 77-token context.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        tmp_path = pathlib.Path(tmp)
        (tmp_path / "vocab.json").write_text(json.dumps(_tokenizer_vocab(), ensure_ascii=False), encoding="utf-8")
        (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        # Loading from files rather than passing vocab_file/merges_file works
        # across transformers 4.x and 5.x (5.x silently ignores those kwargs).
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=_CLIP_MAX_LENGTH,
            bos_token=_BOS_TOKEN,
            eos_token=_EOS_TOKEN,
            unk_token=_EOS_TOKEN,
            pad_token=_EOS_TOKEN,
        )
    expected = len(_tokenizer_vocab())
    if len(tokenizer) != expected:
        raise RuntimeError(f"tiny CLIP tokenizer has {len(tokenizer)} tokens, expected {expected}")
    return tokenizer


def _make_text_encoder(tokenizer, seed: int, hidden_act: str, with_projection: bool = False):
    """A tiny CLIP text encoder; ``with_projection`` adds the pooled projection SDXL's second encoder has."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        # Rounded up past the tokenizer size, like real CLIP's embedding table.
        vocab_size=max(1000, len(tokenizer)),
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=_TEXT_HIDDEN_SIZE,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        # Real ids (not the legacy eos_token_id=2) so pooling picks the real EOS.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: model_class(config).eval())


# --------------------------------------------------------------------------
# Stable Diffusion (v1-style) img2img
# --------------------------------------------------------------------------


def _make_sd_unet(seed: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            # Latent side of a 64x64 image, the default generation size.
            sample_size=64 // SD_VAE_SCALE_FACTOR,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval(),
    )


def _make_sd_vae(seed: int, scaling_factor: float = 0.18215, latent_channels: int = 4, **options):
    from diffusers import AutoencoderKL

    # Four blocks give three 2x downsamplings: the same 8x factor as SD's VAE.
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=latent_channels,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=scaling_factor,
            **options,
        ).eval(),
    )


def _make_sd_scheduler():
    from diffusers import DDIMScheduler

    # SD v1's noise schedule. DDIM (rather than SD's PNDM) because PNDM
    # repeats a timestep, which is awkward at the 1-2 steps tests use.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _make_sd_pipeline(seed: int, safety_checker=None, feature_extractor=None):
    from diffusers import StableDiffusionPipeline

    tokenizer = _make_tokenizer()
    return StableDiffusionPipeline(
        vae=_make_sd_vae(seed),
        text_encoder=_make_text_encoder(tokenizer, seed, hidden_act="quick_gelu"),
        tokenizer=tokenizer,
        unet=_make_sd_unet(seed),
        scheduler=_make_sd_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None,
    )


def _build_sd_img2img(path: pathlib.Path, seed: int) -> None:
    # Saved as the text-to-image class, like real SD checkpoints;
    # AutoPipelineForImage2Image maps it to the img2img pipeline on load.
    _make_sd_pipeline(seed).save_pretrained(path, safe_serialization=True)


def _build_sd_inpainting(path: pathlib.Path, seed: int) -> None:
    # An inpainting checkpoint's UNet takes 9 channels: the noisy latents, the
    # mask and the masked image's latents; it is saved as its inpainting class.
    from diffusers import StableDiffusionInpaintPipeline

    plain = _make_sd_pipeline(seed)
    components = {**plain.components, "unet": _make_sd_unet(seed, in_channels=9)}
    StableDiffusionInpaintPipeline(**components).save_pretrained(path, safe_serialization=True)


# Side of the images the tiny safety checker's CLIP vision tower sees.
_SAFETY_CHECKER_IMAGE_SIZE = 32


def _make_safety_checker(seed: int):
    """A tiny StableDiffusionSafetyChecker whose concept thresholds flag nothing (cosine similarity
    never exceeds 1); a test raises or lowers `concept_embeds_weights` to make it flag."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={
            "hidden_size": _TEXT_HIDDEN_SIZE,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": _TEXT_HIDDEN_SIZE,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": _SAFETY_CHECKER_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=_TEXT_HIDDEN_SIZE,
    )

    def build():
        checker = StableDiffusionSafetyChecker(config).eval()
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(2.0)
            checker.special_care_embeds_weights.fill_(2.0)
        return checker

    return _seeded(seed, build)


def _make_feature_extractor():
    from transformers import CLIPImageProcessor

    side = _SAFETY_CHECKER_IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _build_sd15_safety_checker(path: pathlib.Path, seed: int) -> None:
    pipeline = _make_sd_pipeline(seed, _make_safety_checker(seed), _make_feature_extractor())
    pipeline.save_pretrained(path, safe_serialization=True)
    # As SD 1.5's model_index.json names them, whichever backend class transformers picked.
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_path = path / "feature_extractor" / "preprocessor_config.json"
    preprocessor = json.loads(config_path.read_text())
    preprocessor["image_processor_type"] = "CLIPImageProcessor"
    config_path.write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")


def _build_sd_fp16_variant(path: pathlib.Path, seed: int) -> None:
    import torch

    # Plain float32 files first, then the fp16 variant (other weights) beside them.
    _make_sd_pipeline(seed).save_pretrained(path, safe_serialization=True)
    _make_sd_pipeline(seed + 1).to(torch.float16).save_pretrained(path, safe_serialization=True, variant="fp16")


def _build_sd_bin_beside_safetensors(path: pathlib.Path, seed: int) -> None:
    import torch

    _make_sd_pipeline(seed).save_pretrained(path, safe_serialization=True)
    other = _make_sd_pipeline(seed + 1)
    # Pickle copies (of other weights) beside the safetensors ones, as older repositories ship them.
    for name in ("unet", "vae"):
        getattr(other, name).save_pretrained(path / name, safe_serialization=False)
    torch.save(other.text_encoder.state_dict(), path / "text_encoder" / "pytorch_model.bin")


# Small enough that the tiny UNet, VAE and text encoder each split into several shards.
_SHARD_SIZE = "150KB"


def _build_sd_sharded(path: pathlib.Path, seed: int) -> None:
    _make_sd_pipeline(seed).save_pretrained(path, safe_serialization=True, max_shard_size=_SHARD_SIZE)


# --------------------------------------------------------------------------
# ControlNet (canny) for the sd-img2img UNet; the SDXL one reuses _make_controlnet
# --------------------------------------------------------------------------


def _make_controlnet(unet, seed: int):
    """A ControlNet shaped like ``unet`` whose control image visibly matters."""
    import torch
    from diffusers import ControlNetModel

    def build():
        controlnet = ControlNetModel.from_unet(
            unet,
            # One stride-2 stage per VAE downsampling so the conditioning
            # image lands on the latent grid.
            conditioning_embedding_out_channels=(16, 16, 32, 32),
        )
        # from_unet zero-initialises the output convolutions, so the control
        # image would have no effect at all. Re-initialise them, and give the
        # conditioning encoder variance-preserving weights: with torch's
        # default init its eight stacked convolutions shrink the control
        # signal to almost nothing, and tests need it to visibly matter.
        for module in controlnet.controlnet_cond_embedding.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for module in (
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ):
            module.reset_parameters()
        return controlnet.eval()

    return _seeded(seed, build)


def _build_controlnet_canny(path: pathlib.Path, seed: int) -> None:
    # Rebuilt from the seed rather than read from disk, so this model does not
    # depend on sd-img2img having been built first.
    controlnet = _make_controlnet(_make_sd_unet(seed), seed)
    controlnet.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------
# Stable Diffusion x4 upscaler
# --------------------------------------------------------------------------


def _make_upscaler_unet(seed: int):
    from diffusers import UNet2DConditionModel

    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            sample_size=32,
            # 4 latent channels plus the 3-channel low-resolution image.
            in_channels=7,
            out_channels=4,
            down_block_types=(
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            use_linear_projection=True,
            only_cross_attention=(True, True, False),
            # The noise level is fed in as a class label; the table must cover
            # every level up to max_noise_level (the real model has 1000).
            num_class_embeds=1000,
            norm_num_groups=32,
        ).eval(),
    )


def _make_upscaler_vae(seed: int):
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(32, 32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=128,
            # The value the pipeline insists on (it rewrites anything else).
            scaling_factor=0.08333,
        ).eval(),
    )


def _build_sd_x4_upscaler(path: pathlib.Path, seed: int) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    tokenizer = _make_tokenizer()
    pipeline = StableDiffusionUpscalePipeline(
        vae=_make_upscaler_vae(seed),
        text_encoder=_make_text_encoder(tokenizer, seed, hidden_act="gelu"),
        tokenizer=tokenizer,
        unet=_make_upscaler_unet(seed),
        # Noise schedules modelled on the released x4 upscaler.
        low_res_scheduler=DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="scaled_linear",
        ),
        scheduler=DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    pipeline.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------
# Stable Diffusion x2 latent upscaler
# --------------------------------------------------------------------------


def _make_latent_upscaler_unet(seed: int):
    from diffusers import UNet2DConditionModel

    # The k-diffusion architecture of the released latent upscaler: no mid
    # block, no group norm, 1x1 in/out convolutions and a Fourier time
    # embedding conditioned on the noise level and the pooled prompt. One
    # block fewer than the real model's four: its k-blocks resample with
    # reflection padding, which needs at least 2x2 latents at the deepest
    # level, and three blocks keep that true down to a 32x32 input image.
    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            # The k up-blocks' skip connections only line up for some widths
            # (this works; (32, 32, 64) and (64, 64, 64), for example, fail).
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            # Latent side of the 64x64 output of a 32x32 input.
            sample_size=64 // SD_VAE_SCALE_FACTOR,
            # 4 noisy latent channels plus the 4-channel low-resolution latent.
            in_channels=8,
            # The last channel is a variance the pipeline discards.
            out_channels=5,
            down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
            mid_block_type=None,
            up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
            act_fn="gelu",
            norm_num_groups=None,
            cross_attention_dim=_TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            # The pipeline conditions on a 128-wide noise-level embedding
            # followed by the text encoder's pooled output.
            time_cond_proj_dim=128 + _TEXT_HIDDEN_SIZE,
            resnet_time_scale_shift="scale_shift",
            time_embedding_type="fourier",
            timestep_post_act="gelu",
            conv_in_kernel=1,
            conv_out_kernel=1,
        ).eval(),
    )


def _build_sd_latent_x2_upscaler(path: pathlib.Path, seed: int) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline

    tokenizer = _make_tokenizer()
    pipeline = StableDiffusionLatentUpscalePipeline(
        # The released upscaler works in Stable Diffusion's latent space and
        # ships SD's VAE, so it shares the 8x factor.
        vae=_make_sd_vae(seed),
        text_encoder=_make_text_encoder(tokenizer, seed, hidden_act="quick_gelu"),
        tokenizer=tokenizer,
        unet=_make_latent_upscaler_unet(seed),
        # The model predicts the clean sample (the pipeline applies Karras
        # preconditioning around it), not the noise.
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="sample",
        ),
    )
    pipeline.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------
# LDM 4x super-resolution
# --------------------------------------------------------------------------


def _build_ldm_super_resolution(path: pathlib.Path, seed: int) -> None:
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    unet = _seeded(
        seed,
        lambda: UNet2DModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            # 3 noisy latent channels plus the 3-channel low-resolution image,
            # both at the input's resolution.
            in_channels=6,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32,
        ).eval(),
    )
    # Only the decoder is used; its two 2x upsamplings make the 4x upscale.
    vqvae = _seeded(
        seed,
        lambda: VQModel(
            block_out_channels=(32, 32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=3,
            layers_per_block=1,
            norm_num_groups=32,
            num_vq_embeddings=64,
            sample_size=32 * LDM_VQ_SCALE_FACTOR,
        ).eval(),
    )
    pipeline = LDMSuperResolutionPipeline(
        vqvae=vqvae,
        unet=unet,
        # The noise schedule of CompVis' LDM super-resolution config (its
        # "linear" schedule is linear in sqrt(beta): diffusers' scaled_linear).
        scheduler=DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.0015,
            beta_end=0.0195,
            beta_schedule="scaled_linear",
            clip_sample=False,
        ),
    )
    pipeline.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------
# Stable Diffusion XL (img2img) and its ControlNet
# --------------------------------------------------------------------------

# SDXL conditions on six micro-conditioning numbers (original size, crop
# corner, target size), each embedded this wide, next to the pooled prompt.
_SDXL_TIME_EMBED_DIM = 8
_SDXL_TIME_IDS = 6


def _make_sdxl_unet(seed: int):
    from diffusers import UNet2DConditionModel

    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=64 // SD_VAE_SCALE_FACTOR,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            # SDXL stacks several transformer layers in its deeper blocks.
            transformer_layers_per_block=(1, 2),
            # Both text encoders' hidden states, concatenated.
            cross_attention_dim=2 * _TEXT_HIDDEN_SIZE,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            # Time ids without an aesthetic score (the base model's layout),
            # then text_encoder_2's pooled projection.
            projection_class_embeddings_input_dim=_SDXL_TIME_IDS * _SDXL_TIME_EMBED_DIM + _TEXT_HIDDEN_SIZE,
            norm_num_groups=32,
        ).eval(),
    )


def _build_sdxl_img2img(path: pathlib.Path, seed: int) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = _make_tokenizer()
    pipeline = StableDiffusionXLPipeline(
        vae=_make_sd_vae(seed, scaling_factor=0.13025),
        # CLIP ViT-L and OpenCLIP bigG in the real model. The second is seeded
        # differently so the two encoders do not share weights.
        text_encoder=_make_text_encoder(tokenizer, seed, hidden_act="quick_gelu"),
        text_encoder_2=_make_text_encoder(tokenizer, seed + 1, hidden_act="gelu", with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_make_sdxl_unet(seed),
        # SDXL base's scheduler settings.
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        ),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    # Saved as the text-to-image class like SDXL base. Loading it as img2img
    # then leaves requires_aesthetics_score at its default, False, which is
    # what the UNet's time-id width above expects.
    pipeline.save_pretrained(path, safe_serialization=True)


def _build_controlnet_sdxl_canny(path: pathlib.Path, seed: int) -> None:
    # Rebuilt from the seed, so sdxl-img2img need not exist.
    controlnet = _make_controlnet(_make_sdxl_unet(seed), seed)
    controlnet.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------
# LoRA adapter for the sd-img2img UNet
# --------------------------------------------------------------------------


def _build_lora_sd(path: pathlib.Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # Rebuilt from the seed: the adapter only needs the UNet's layer shapes.
    unet = _make_sd_unet(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        # peft's default zero-initialises lora_B, which would make the adapter
        # a no-op; random A and B make it change the output.
        init_lora_weights=False,
    )
    _seeded(seed, lambda: unet.add_adapter(config))
    StableDiffusionPipeline.save_lora_weights(
        path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        weight_name=LORA_WEIGHT_NAME,
        # No adapter metadata, like most published LoRA files: loaders read
        # the rank from tensor shapes and default alpha to it, which is exact
        # here because alpha equals the rank.
        safe_serialization=True,
    )


def _build_sd_instruct_pix2pix(path: pathlib.Path, seed: int) -> None:
    # An InstructPix2Pix checkpoint's UNet takes 8 channels: the noisy latents
    # and the input image's latents; saved as its own class, like
    # timbrooks/instruct-pix2pix.
    from diffusers import StableDiffusionInstructPix2PixPipeline

    plain = _make_sd_pipeline(seed)
    components = {**plain.components, "unet": _make_sd_unet(seed, in_channels=8)}
    pipeline = StableDiffusionInstructPix2PixPipeline(**components, requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------
# IP-Adapter for the sd-img2img UNet
# --------------------------------------------------------------------------

# Side of the images the tiny IP-Adapter's CLIP vision encoder sees.
_IP_ADAPTER_IMAGE_SIZE = 32


def _build_ip_adapter_sd(path: pathlib.Path, seed: int) -> None:
    """An IP-Adapter for ``sd-img2img``'s UNet as ``load_ip_adapter`` reads it: one safetensors file of
    ``image_proj.*`` (a plain IP-Adapter's projection of the image embedding to 4 tokens) and
    ``ip_adapter.*`` tensors (the key and value projections of each cross-attention layer, numbered as
    diffusers numbers them), and beside it ``image_encoder/``: a CLIP vision model with projection and
    its image processor config, as h94/IP-Adapter ships them."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = _make_sd_unet(seed)
    tokens = 4  # image tokens a plain IP-Adapter adds to the text's

    def weights() -> dict:
        cross_attention_dim = unet.config.cross_attention_dim
        tensors = {
            "image_proj.proj.weight": torch.randn(tokens * cross_attention_dim, _TEXT_HIDDEN_SIZE) * 0.2,
            "image_proj.proj.bias": torch.randn(tokens * cross_attention_dim) * 0.2,
            "image_proj.norm.weight": torch.ones(cross_attention_dim),
            "image_proj.norm.bias": torch.zeros(cross_attention_dim),
        }
        # diffusers numbers the cross-attention processors 1, 3, 5, ... in `attn_processors` order
        # (the original IP-Adapter's numbering, where the even numbers were self-attention's).
        number = 1
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                attention = unet.get_submodule(name.removesuffix(".processor"))
                shape = (attention.to_k.out_features, attention.to_k.in_features)
                tensors[f"ip_adapter.{number}.to_k_ip.weight"] = torch.randn(shape) * 0.2
                tensors[f"ip_adapter.{number}.to_v_ip.weight"] = torch.randn(shape) * 0.2
                number += 2
        return {key: value.contiguous() for key, value in tensors.items()}

    save_file(_seeded(seed, weights), str(path / IP_ADAPTER_WEIGHT_NAME))
    encoder_config = CLIPVisionConfig(
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_IP_ADAPTER_IMAGE_SIZE,
        patch_size=8,
        projection_dim=_TEXT_HIDDEN_SIZE,
    )
    encoder = _seeded(seed, lambda: CLIPVisionModelWithProjection(encoder_config).eval())
    encoder.save_pretrained(path / "image_encoder", safe_serialization=True)
    processor = CLIPImageProcessor(size=_IP_ADAPTER_IMAGE_SIZE, crop_size=_IP_ADAPTER_IMAGE_SIZE)
    processor.save_pretrained(path / "image_encoder")


# --------------------------------------------------------------------------
# Stable Diffusion 3 and Flux (flow-matching transformers)
# --------------------------------------------------------------------------

# Width of the tiny T5 encoder, which both transformers attend to. SD3 pads
# its two CLIP encoders' concatenated hidden states up to this width, so it
# is at least their sum.
_T5_HIDDEN_SIZE = 2 * _TEXT_HIDDEN_SIZE
# Prompt tokens T5 sees: SD3's and Flux's pipelines pad prompts to their own
# max_sequence_length (256 and 512); this is the tokenizer's own limit.
_T5_MAX_LENGTH = 512
# SD3's and Flux's VAEs have 16 latent channels (SD's have 4).
_FLOW_LATENT_CHANNELS = 16


def _make_t5_tokenizer():
    """An offline T5 tokenizer: a Unigram model over the printable ASCII
    characters, alone and after SentencePiece's word-start mark, with T5's
    special tokens and sentinel ids. Other characters become <unk>."""
    from transformers import T5TokenizerFast

    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    # T5's layout: <pad>, </s>, <unk>, then the pieces; whole-word-start
    # pieces score higher, so a word begins with one.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\N{LOWER ONE EIGHTH BLOCK}", -3.0)]
    vocab += [("\N{LOWER ONE EIGHTH BLOCK}" + char, -2.0) for char in characters]
    vocab += [(char, -3.0) for char in characters]
    return T5TokenizerFast(vocab=vocab, extra_ids=100, model_max_length=_T5_MAX_LENGTH)


def _make_t5_encoder(tokenizer, seed: int):
    """A tiny T5 v1.1 encoder (gated GELU), as SD3 and Flux ship."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=max(256, len(tokenizer)),
        d_model=_T5_HIDDEN_SIZE,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, lambda: T5EncoderModel(config).eval())


def _make_flow_vae(seed: int, scaling_factor: float, shift_factor: float):
    """SD3's and Flux's VAE layout: 16 latent channels, a shift besides the
    scale, no quantisation convolutions; the same 8x factor as SD's."""
    return _make_sd_vae(
        seed,
        scaling_factor,
        latent_channels=_FLOW_LATENT_CHANNELS,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_sd3_img2img(path: pathlib.Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = _make_tokenizer()
    t5_tokenizer = _make_t5_tokenizer()
    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=64 // SD_VAE_SCALE_FACTOR,
            # SD3 denoises 2x2 patches of latents: image sides are multiples of 16.
            patch_size=2,
            in_channels=_FLOW_LATENT_CHANNELS,
            out_channels=_FLOW_LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_T5_HIDDEN_SIZE,
            # The transformer's width (heads x head size), as in the real model.
            caption_projection_dim=32,
            # Both CLIP encoders' pooled projections, concatenated.
            pooled_projection_dim=2 * _TEXT_HIDDEN_SIZE,
            # Position embeddings for latents up to 64x64 (512x512 images).
            pos_embed_max_size=32,
        ).eval(),
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        # SD3 medium's scheduler.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_make_flow_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        # CLIP ViT-L and OpenCLIP bigG, both with their pooled projections,
        # then T5-XXL in the real model.
        text_encoder=_make_text_encoder(tokenizer, seed, hidden_act="quick_gelu", with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_make_text_encoder(tokenizer, seed + 1, hidden_act="gelu", with_projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=_make_t5_encoder(t5_tokenizer, seed),
        tokenizer_3=t5_tokenizer,
    )
    # Saved as the text-to-image class, like real SD3 checkpoints.
    pipeline.save_pretrained(path, safe_serialization=True)


def _build_flux_img2img(path: pathlib.Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = _make_tokenizer()
    t5_tokenizer = _make_t5_tokenizer()
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            # The pipeline packs 2x2 latent patches into the channels (so image
            # sides are multiples of 16).
            in_channels=4 * _FLOW_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_HIDDEN_SIZE,
            # CLIP's pooled output.
            pooled_projection_dim=_TEXT_HIDDEN_SIZE,
            # FLUX.1 [dev]: guidance_scale is embedded, not applied as CFG.
            guidance_embeds=True,
            # Rotary axes (id, row, column), summing to the head size.
            axes_dims_rope=(4, 6, 6),
        ).eval(),
    )
    pipeline = FluxPipeline(
        # FLUX.1 [dev]'s scheduler: the shift grows with the image's size.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_make_flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_make_text_encoder(tokenizer, seed, hidden_act="quick_gelu"),
        tokenizer=tokenizer,
        text_encoder_2=_make_t5_encoder(t5_tokenizer, seed),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    # Saved as the text-to-image class, like real Flux checkpoints.
    pipeline.save_pretrained(path, safe_serialization=True)


def _build_t2i_adapter_canny(path: pathlib.Path, seed: int) -> None:
    """A T2I-Adapter for sd-img2img, taking one-channel edge maps as TencentARC's canny adapters do.

    Its feature widths are the UNet's block widths. sd-img2img's UNet starts with a plain
    DownBlock2D, which (like SDXL's) takes the adapter's features after its downsampler, so the
    adapter has SDXL's layout: both feature maps at 1/16 of the image (a total downscale of 32).
    """
    from diffusers import T2IAdapter

    channels = list(_make_sd_unet(seed).config.block_out_channels)
    adapter = _seeded(
        seed,
        lambda: T2IAdapter(
            in_channels=1,
            channels=channels,
            num_res_blocks=1,
            downscale_factor=2 * SD_VAE_SCALE_FACTOR,
            adapter_type="full_adapter_xl",
        ).eval(),
    )
    adapter.save_pretrained(path, safe_serialization=True)


def _build_depth_dpt(path: pathlib.Path, seed: int) -> None:
    """A depth annotator in transformers' layout: a DPT (ViT backbone, four reassembled stages) with
    the image processor Intel/dpt-hybrid-midas ships, at 32x32 so a call takes milliseconds."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        backbone_out_indices=[0, 1, 2, 3],
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        is_hybrid=False,
    )
    _seeded(seed, lambda: DPTForDepthEstimation(config).eval()).save_pretrained(path, safe_serialization=True)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def _build_seg_segformer(path: pathlib.Path, seed: int) -> None:
    """A segmentation annotator in transformers' layout: a two-stage SegFormer with ADE20K's 150
    labels (named as nvidia/segformer-b0-finetuned-ade-512-512 names them) and its image processor."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from operators.annotators import ADE20K_CLASSES

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=len(ADE20K_CLASSES),
        id2label=dict(enumerate(ADE20K_CLASSES)),
        label2id={name: index for index, name in enumerate(ADE20K_CLASSES)},
    )
    model = _seeded(seed, lambda: SegformerForSemanticSegmentation(config).eval())
    model.save_pretrained(path, safe_serialization=True)
    SegformerImageProcessor(size={"height": 32, "width": 32}, do_reduce_labels=True).save_pretrained(path)


def _build_pose_vitpose(path: pathlib.Path, seed: int) -> None:
    """A pose annotator in transformers' layout: a two-layer ViTPose (ViT backbone, simple decoder) with
    COCO's 17 keypoints (named as usyd-community/vitpose-base-simple names them) and its image processor,
    at 32x24 so a call takes milliseconds."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    from operators.annotators import COCO_KEYPOINTS

    backbone = VitPoseBackboneConfig(
        image_size=[32, 24],
        patch_size=[8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[2],
    )
    config = VitPoseConfig(
        backbone_config=backbone,
        id2label=dict(enumerate(COCO_KEYPOINTS)),
        label2id={name: index for index, name in enumerate(COCO_KEYPOINTS)},
    )
    _seeded(seed, lambda: VitPoseForPoseEstimation(config).eval()).save_pretrained(path, safe_serialization=True)
    VitPoseImageProcessor(size={"height": 32, "width": 24}).save_pretrained(path)


_BUILDERS: dict[str, Callable[[pathlib.Path, int], None]] = {
    "sd-img2img": _build_sd_img2img,
    "sd-inpainting": _build_sd_inpainting,
    "controlnet-canny": _build_controlnet_canny,
    "sd-x4-upscaler": _build_sd_x4_upscaler,
    "sd-latent-x2-upscaler": _build_sd_latent_x2_upscaler,
    "ldm-super-resolution": _build_ldm_super_resolution,
    "sdxl-img2img": _build_sdxl_img2img,
    "controlnet-sdxl-canny": _build_controlnet_sdxl_canny,
    "lora-sd": _build_lora_sd,
    "sd-instruct-pix2pix": _build_sd_instruct_pix2pix,
    "ip-adapter-sd": _build_ip_adapter_sd,
    "t2i-adapter-canny": _build_t2i_adapter_canny,
    "depth-dpt": _build_depth_dpt,
    "seg-segformer": _build_seg_segformer,
    "pose-vitpose": _build_pose_vitpose,
    "sd15-safety-checker": _build_sd15_safety_checker,
    "sd-fp16-variant": _build_sd_fp16_variant,
    "sd-bin-beside-safetensors": _build_sd_bin_beside_safetensors,
    "sd-sharded": _build_sd_sharded,
    "sd3-img2img": _build_sd3_img2img,
    "flux-img2img": _build_flux_img2img,
}

_PICKLE_BESIDE_SAFETENSORS = {"sd-bin-beside-safetensors"}
