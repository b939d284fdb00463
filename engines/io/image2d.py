"""2D images (PNG, JPEG, TIFF, BMP) via Pillow → a one-slice ``Volume``.

Modes: 1 / L / I;16* / I / F → grey float32 (H, W) in stored units (a 16-bit PNG keeps its
0..65535 values); RGB, RGBA (alpha dropped), CMYK, YCbCr, LAB → RGB float32 (H, W, 3) in 0..255;
LA → grey; P (palette) → RGB, or grey when the palette is grey. An RGB image whose three
channels are identical is returned as grey (flag ``grey_as_rgb``). Multi-page TIFF: the first
page (flag ``first_page``). EXIF orientation is applied.

Pillow's decompression-bomb protection stays on: its ``DecompressionBombError`` (above
2 × ``Image.MAX_IMAGE_PIXELS``) and our own ``ReadLimits.max_slice_pixels`` both map to
``TooLarge``, checked from the header before the pixels are decoded.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from engines.errors import MediqaError, TooLarge, Truncated, UnreadableInput, UnsupportedInput
from engines.io.limits import DEFAULT_LIMITS, ReadLimits
from engines.io.volume import Volume

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _to_array(img: "Image.Image", flags: list[str]) -> np.ndarray:  # type: ignore[name-defined]  # noqa: F821
    mode = img.mode
    if mode == "P" or mode == "PA":
        rgb = img.convert("RGB")
        arr = np.asarray(rgb, dtype=np.float32)
    elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    elif mode in ("LA", "La"):
        arr = np.asarray(img.getchannel(0), dtype=np.float32)
    elif mode == "1":
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    elif mode in ("L", "I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16") and arr.ndim != 2:
            arr = np.asarray(img.convert("I"), dtype=np.float32)
    else:
        raise UnsupportedInput(f"image mode {mode} is not supported")
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise UnsupportedInput(f"image with {arr.shape[-1]} channels is not supported")
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = np.ascontiguousarray(arr[..., 0])
            flags.append("grey_as_rgb")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_image2d(path: Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> Volume:
    """Read a 2D image file → ``Volume`` with ``array`` float32 (1, H, W) or (1, H, W, 3).

    ``spacing`` is (1, 1, 1) with flag ``spacing_unknown`` (image files carry no reliable mm scale).
    Raises ``TooLarge``, ``Truncated`` or ``UnreadableInput``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    flags: list[str] = ["spacing_unknown"]
    try:
        if path.stat().st_size == 0:
            raise UnreadableInput("empty file (0 bytes)")
    except OSError as exc:
        raise UnreadableInput(f"cannot stat file ({type(exc).__name__})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as img:
                w, h = img.size
                bands = len(img.getbands())
                limits.check_slice(h, w, min(bands, 3), what="image")
                if getattr(img, "n_frames", 1) > 1:
                    flags.append("first_page")
                    img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                arr = _to_array(img, flags)
        except MediqaError:
            raise
        except Image.DecompressionBombError:
            raise TooLarge("image exceeds Pillow's decompression-bomb limit") from None
        except UnidentifiedImageError:
            raise UnreadableInput("not a recognised image file") from None
        except OSError as exc:
            if "truncated" in str(exc).lower():
                raise Truncated("image data is truncated") from None
            raise UnreadableInput(f"image could not be decoded ({type(exc).__name__})") from None
        except MemoryError:
            raise TooLarge("not enough memory to decode the image") from None
        except Exception as exc:  # noqa: BLE001 - the per-file boundary
            raise UnreadableInput(f"image could not be decoded ({type(exc).__name__})") from None
    meta = {"Rows": float(arr.shape[0]), "Columns": float(arr.shape[1]),
            "PhotometricInterpretation": "RGB" if arr.ndim == 3 else "MONOCHROME2"}
    return Volume(array=arr[None], spacing=(1.0, 1.0, 1.0), meta=meta, flags=flags)


def image_header(path: Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, float | str]:
    """Header-only look at an image (size and mode) for the scan; same errors as ``read_image2d``."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if Path(path).stat().st_size == 0:
                raise UnreadableInput("empty file (0 bytes)")
            with Image.open(path) as img:
                w, h = img.size
                limits.check_slice(h, w, min(len(img.getbands()), 3), what="image")
                colour = img.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA")
        except MediqaError:
            raise
        except Image.DecompressionBombError:
            raise TooLarge("image exceeds Pillow's decompression-bomb limit") from None
        except UnidentifiedImageError:
            raise UnreadableInput("not a recognised image file") from None
        except Exception as exc:  # noqa: BLE001
            raise UnreadableInput(f"image header could not be read ({type(exc).__name__})") from None
    return {"Rows": float(h), "Columns": float(w), "PhotometricInterpretation": "RGB" if colour else "MONOCHROME2"}
