"""The one rule that turns a decoded image file into uint8 RGB, and a label file into uint8 ids.

Dataset preparation (`semseg.read_image`, `semseg.read_label`) and prediction
(`predict.read_image`) both use these functions, so a file reads the same everywhere.

Images, by PIL mode (`to_rgb`):
- RGB: as it is. PIL opens 16-bit-per-channel (48-bit) PNGs as RGB already, keeping the high
  byte of each sample (v >> 8); 16-bit LA and RGBA PNGs likewise.
- L, 1, LA, P, PA, RGBA, RGBX, RGBa, CMYK, YCbCr, LAB, HSV: PIL's `convert("RGB")`. Alpha is
  dropped, not composited onto a background: a transparent pixel keeps its colour (for P, the
  palette colour). A palette with per-entry alpha goes through RGBA, the conversion PIL asks
  for, so it warns nothing.
- I;16, I;16L, I;16B, I;16N (16-bit greyscale, e.g. a 16-bit PNG), and I (32-bit integers)
  whose values all lie in 0..65535: each value v becomes v >> 8, copied to the 3 channels.
  v >> 8 (not round(v / 257)) because it is what PIL itself does to every other 16-bit PNG
  (48-bit RGB, 16-bit LA and RGBA) and what TensorFlow's `decode_png` does to 16-bit PNGs: a
  16-bit greyscale file then reads as the same picture stored as 48-bit RGB would. Both
  rules map 0 -> 0 and 65535 -> 255 and differ by at most 1 in between.
- I with a value outside 0..65535, F (32-bit float) and any mode PIL cannot convert to RGB:
  refused (`UnsupportedImageError`), since there is no range to scale from; convert the file
  to 8-bit RGB first.

Labels (`to_label`): the integer values as they are, from L, P (the indices, not the colours),
16-bit greyscale (I;16*) or I; any value outside 0..255 is refused, naming the largest (or
smallest) one, as is any other mode (RGB, float, ...).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
"""PIL's 16-bit greyscale modes (unsigned)."""

INTEGER_MODES = ("L", "P", "I", *SIXTEEN_BIT_MODES)
"""Modes whose pixels are single integers: the modes a label file may have."""


class UnsupportedImageError(ValueError):
    """An image (or label) file whose mode or values have no defined conversion."""


def to_rgb(image: Image.Image, where: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image of any supported mode, by the module's rule.

    `where` names the file in the error (`UnsupportedImageError`, one line).
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode == "I" or mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        low, high = _range(values)
        if low < 0 or high > 0xFFFF:
            raise UnsupportedImageError(
                f"{where} has image mode {mode!r} with values {low}..{high}, outside the 16-bit "
                "range 0..65535 that is scaled to 8 bits; convert the file to 8-bit RGB"
            )
        grey = (values >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        raise UnsupportedImageError(
            f"{where} has image mode 'F' (32-bit float), which has no defined 8-bit range; "
            "convert the file to 8-bit RGB (or 8/16-bit greyscale)"
        )
    if mode == "P" and isinstance(image.info.get("transparency"), bytes):
        image = image.convert("RGBA")  # per-entry alpha: PIL warns on a direct P -> RGB
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as e:  # PIL: "conversion from X to RGB not supported"
        raise UnsupportedImageError(
            f"{where} has image mode {mode!r}, which cannot be converted to RGB ({e}); "
            "convert the file to 8-bit RGB"
        ) from e


def to_label(image: Image.Image, where: str = "label") -> np.ndarray:
    """uint8 [H, W] label values from a 1-channel integer image (8 or 16 bit, values 0..255).

    Raises `UnsupportedImageError` (one line, naming `where`) for another mode or a value
    outside 0..255.
    """
    mode = image.mode
    if mode not in INTEGER_MODES:
        raise UnsupportedImageError(
            f"{where} has image mode {mode!r}; a label map must be 1 channel of integers "
            f"({', '.join(INTEGER_MODES)}) with values 0..255"
        )
    values = np.asarray(image)
    if values.dtype == np.uint8:
        return values
    low, high = _range(values)
    if low < 0 or high > 255:
        bad = f"a largest value of {high}" if high > 255 else f"a smallest value of {low}"
        raise UnsupportedImageError(
            f"{where} (image mode {mode!r}) has {bad}; label values must be 0..255 "
            "to be stored as uint8: remap the file's values into 0..255"
        )
    return values.astype(np.uint8)


def _range(values: np.ndarray) -> tuple[int, int]:
    """(min, max) as Python ints; (0, 0) for an empty image."""
    if values.size == 0:
        return 0, 0
    return int(values.min()), int(values.max())
