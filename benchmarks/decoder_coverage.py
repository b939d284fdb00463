"""Which pydicom pixel-data plugin decodes more of the compressed test files? (issue 2)

For every compressed image file in pydicom's and pydicom-data's test folders, try each installed
decoding plugin on its own (``pydicom.pixels.pixel_array(..., decoding_plugin=NAME)``) and count
successes per plugin family. Usage: ``python benchmarks/decoder_coverage.py`` (install
``python-gdcm`` beside the default pylibjpeg plugins to compare the two).
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import pydicom
from pydicom.pixels import get_decoder, pixel_array

FAMILIES = {"pylibjpeg": ("pylibjpeg",), "gdcm": ("gdcm",), "pillow": ("pillow",), "pydicom (native RLE)": ("pydicom",)}


def test_dirs() -> list[Path]:
    from pydicom.data import get_testdata_file

    dirs = [Path(pydicom.__file__).parent / "data" / "test_files"]
    extra = get_testdata_file("eCT_Supplemental.dcm")
    if extra:
        dirs.append(Path(extra).parent)
    return dirs


def main() -> None:
    ok: dict[str, set[str]] = collections.defaultdict(set)
    files: list[str] = []
    for d in test_dirs():
        for path in sorted(d.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ts = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID))
            except Exception:  # noqa: BLE001 - not a readable DICOM file: not part of the count
                continue
            if not ts.is_compressed or "Rows" not in ds:
                continue
            files.append(path.name)
            try:
                plugins = list(get_decoder(ts).available_plugins)
            except Exception:  # noqa: BLE001 - no decoder for this syntax at all
                plugins = []
            for fam, names in FAMILIES.items():
                for plugin in plugins:
                    if plugin not in names:
                        continue
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            pixel_array(path, index=0 if int(ds.get("NumberOfFrames") or 1) > 1 else None,
                                        decoding_plugin=plugin)
                        ok[fam].add(path.name)
                    except Exception:  # noqa: BLE001 - this plugin cannot decode this file
                        pass
    print(f"{len(files)} compressed image files")
    for fam in FAMILIES:
        print(f"  {fam:22s} {len(ok[fam]):3d} / {len(files)}")
    union = set().union(*ok.values()) if ok else set()
    print(f"  {'any':22s} {len(union):3d} / {len(files)}; none: {sorted(set(files) - union)}")


if __name__ == "__main__":
    main()
