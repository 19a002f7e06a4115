"""Operators transform batches of rows; each file holds one operator's config and class.

`OPERATORS` maps each config class to the class that runs it; the job config accepts exactly
these kinds. Importing this package does not import torch or diffusers: operators import them
when they load a model.
"""

from operators.controlnet import ControlNetImg2Img, ControlNetImg2ImgConfig
from operators.img2img import Img2Img, Img2ImgConfig
from operators.standardize import Standardize, StandardizeConfig
from operators.upscale import Upscale, UpscaleConfig

OPERATORS = {
    Img2ImgConfig: Img2Img,
    ControlNetImg2ImgConfig: ControlNetImg2Img,
    UpscaleConfig: Upscale,
    StandardizeConfig: Standardize,
}

__all__ = [
    "OPERATORS",
    "ControlNetImg2Img",
    "ControlNetImg2ImgConfig",
    "Img2Img",
    "Img2ImgConfig",
    "Standardize",
    "StandardizeConfig",
    "Upscale",
    "UpscaleConfig",
]
