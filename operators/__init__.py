"""Operators transform batches of rows; each file holds one operator's config and class.

`OPERATORS` maps each config class to the operator class that runs it, derived from the classes'
`config_class`; the job config accepts exactly these kinds. Importing this package does not import
torch or diffusers: operators import them when they load a model.
"""

from operators.controlnet import ControlNetImg2Img, ControlNetImg2ImgConfig
from operators.img2img import Img2Img, Img2ImgConfig
from operators.inpaint import Inpaint, InpaintConfig
from operators.instruct import InstructEdit, InstructEditConfig
from operators.outpaint import Outpaint, OutpaintConfig
from operators.standardize import Standardize, StandardizeConfig
from operators.t2i_adapter import T2IAdapterText2Image, T2IAdapterText2ImageConfig
from operators.upscale import Upscale, UpscaleConfig

OPERATOR_CLASSES = (
    Img2Img,
    ControlNetImg2Img,
    Inpaint,
    Outpaint,
    InstructEdit,
    T2IAdapterText2Image,
    Upscale,
    Standardize,
)
OPERATORS = {operator.config_class: operator for operator in OPERATOR_CLASSES}

__all__ = [
    "OPERATORS",
    "OPERATOR_CLASSES",
    "ControlNetImg2Img",
    "ControlNetImg2ImgConfig",
    "Img2Img",
    "Img2ImgConfig",
    "Inpaint",
    "InpaintConfig",
    "Outpaint",
    "OutpaintConfig",
    "InstructEdit",
    "InstructEditConfig",
    "Standardize",
    "StandardizeConfig",
    "T2IAdapterText2Image",
    "T2IAdapterText2ImageConfig",
    "Upscale",
    "UpscaleConfig",
]
