#!/usr/bin/env bash
# Build .whl/site312.tar.xz for scripts/device_run.sh: the packages mediqa synth / train need that the
# lent GPU machine's image lacks (Python 3.12, no network), unpacked from PyPI wheels and trimmed to
# the files the corpus generator reads, so that repo + packages stay under the 64 MiB that travel.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl pydicom==3.0.2 pydicom-data==1.0.0 nibabel==5.4.2 \
  pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0 pylibjpeg-libjpeg==2.4.0 pylibjpeg-rle==2.2.0 \
  dipy==1.12.1 PyWavelets==1.10.0 heudiconv==1.5.1
S=$(mktemp -d)/site312; mkdir -p "$S"
for w in .whl/*.whl; do unzip -q -o "$w" -d "$S"; done
# pydicom-data: only the base images of training/synth/sources.py
KEEP=" 693_UNCR.dcm explicit_VR-UN.dcm bad_sequence.dcm MR2_UNCR.dcm MR-SIEMENS-DICOM-WithOverlays.dcm emri_small.dcm RG1_UNCR.dcm RG3_UNCR.dcm "
for f in "$S"/data_store/data/*; do case "$KEEP" in *" $(basename "$f") "*) ;; *) rm -rf "$f";; esac; done
# dipy: the package marker and its two MR files (synth reads them through importlib.resources)
rm -rf "$S"/data_store/tests "$S"/pywt/tests "$S"/dipy.libs "$S"/dipy-*.data
find "$S/dipy" -mindepth 1 -maxdepth 1 ! -name __init__.py ! -name version.py ! -name data -exec rm -rf {} +
find "$S/dipy/data" -mindepth 1 -maxdepth 1 ! -name files -exec rm -rf {} +
find "$S/dipy/data/files" -type f ! -name S0_10slices.nii.gz ! -name t1_coronal_slice.npy -delete
# nibabel: its two test volumes stay (anatomical.nii, example4d.nii.gz), its tests go
find "$S/nibabel/tests" -maxdepth 1 -name "test_*.py" -delete
find "$S/nibabel/tests/data" -type f ! -name anatomical.nii ! -name example4d.nii.gz -delete
find "$S/nibabel" -mindepth 2 -type d -name tests -exec rm -rf {} +
# heudiconv: only the package marker and the two mosaics of `synth: train_extra_mr` (located, never imported)
find "$S/heudiconv" -mindepth 1 -maxdepth 1 ! -name __init__.py ! -name tests -exec rm -rf {} +
find "$S/heudiconv/tests" -type f ! -name axasc35.dcm ! -name 'b0dwi_for_fmap+00001.dcm' -delete
find "$S/heudiconv/tests" -type d -empty -delete
# scikit-image's retina.jpg (the fundus source), in case the machine's scikit-image lacks it
mkdir -p "$S/_extra" && cp "$(.venv/bin/python -c 'import skimage, os; print(os.path.join(os.path.dirname(skimage.__file__), "data", "retina.jpg"))')" "$S/_extra/"
find "$S" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$(dirname "$S")" -cJf .whl/site312.tar.xz site312
ls -la .whl/site312.tar.xz
