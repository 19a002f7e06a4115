"""Operators transform batches of rows; each file holds one operator's config and class.

`OPERATORS` maps each config class to the class that runs it. Importing this package does not
import torch or diffusers: operators import them when they load a model.
"""

from operators.img2img import Img2Img, Img2ImgConfig

OPERATORS = {
    Img2ImgConfig: Img2Img,
}

__all__ = ["OPERATORS", "Img2Img", "Img2ImgConfig"]
