"""Study ids, the key file, cell escaping, scrubbing and the logging filter."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import stat
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from engines import privacy
from engines.privacy import (
    PHI_KEYWORDS,
    REDACTED,
    ScrubFilter,
    escape_cell,
    identifiers_from_dataset,
    install_log_scrubber,
    key_path,
    register_identifiers,
    scrub,
    study_id,
    study_key,
)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.delenv(privacy.ENV_KEY, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    privacy.clear_identifiers()
    yield
    privacy.clear_identifiers()


# --- study ids and the key ----------------------------------------------------------------------

def test_study_id_is_a_keyed_hash_prefix():
    uid = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    sid = study_id(uid, b"k" * 32)
    assert len(sid) == 16 and int(sid, 16) >= 0
    assert sid == hmac.new(b"k" * 32, uid.encode(), hashlib.sha256).hexdigest()[:16]
    assert sid == study_id(uid, b"k" * 32)
    assert sid != study_id(uid, b"j" * 32)          # another key, another id
    assert sid != study_id(uid + "1", b"k" * 32)
    assert uid not in sid


def test_key_from_environment(monkeypatch):
    monkeypatch.setenv(privacy.ENV_KEY, "a-long-enough-site-secret")
    assert study_key() == b"a-long-enough-site-secret"
    assert not key_path().exists()  # the variable wins, no file is created
    assert study_id("x") == study_id("x", b"a-long-enough-site-secret")


def test_key_file_created_once_with_mode_0600(tmp_path):
    path = key_path()
    assert path == tmp_path / "config" / "mediqa" / "key"
    k1 = study_key()
    assert path.is_file() and len(k1) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert study_key() == k1  # persisted, not regenerated
    assert study_key(tmp_path / "other" / "key") != k1  # an explicit path: a different key


def test_key_file_readable_by_others_warns_and_empty_file_fails(tmp_path, caplog):
    p = tmp_path / "shared.key"
    p.write_text("0123456789abcdef0123456789abcdef\n")
    os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, logger="engines.privacy"):
        assert study_key(p) == b"0123456789abcdef0123456789abcdef"
    assert "readable by others" in caplog.text
    empty = tmp_path / "empty.key"
    empty.write_text("")
    with pytest.raises(OSError, match="empty"):
        study_key(empty)


# --- cells ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("+C", "'+C"), ("-C", "'-C"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("-2+3", "'-2+3"), ("=1", "'=1"),
    ("-1024", "-1024"), ("+1.5e3", "+1.5e3"), ("-0.25", "-0.25"),
    ("CT HEAD", "CT HEAD"), ("a=b", "a=b"), ("", ""), (3.5, 3.5), (None, None),
])
def test_escape_cell(value, expected):
    assert escape_cell(value) == expected


# --- scrubbing -----------------------------------------------------------------------------------

def test_scrub_person_names_and_pydicom_values():
    assert scrub("reading DOE^JANE from disk") == f"reading {REDACTED} from disk"
    assert scrub("name='Müller^Hans^^Dr.'") == f"name='{REDACTED}'"
    assert "45 years" not in scrub("Invalid value for VR AS: '45 years'.")
    assert scrub("Invalid value for VR AS: '45 years'.").startswith("Invalid value for VR AS: ")
    assert scrub("series 3 has 12 slices, window 40/400") == "series 3 has 12 slices, window 40/400"


def test_registered_identifiers_are_removed_case_insensitively():
    register_identifiers(["CANARY^ZEBRA", "PID-7731", "ab", None])
    out = scrub("file of canary zebra, patient pid-7731, ab test")
    assert "canary" not in out.lower() and "zebra" not in out.lower()
    assert "7731" not in out
    assert "ab test" in out  # values under 3 characters are not registered


def test_identifiers_from_a_real_dataset(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "CANARY^ZEBRA"
    ds.PatientID = "PID-7731"
    ds.OtherPatientIDs = ["OLD-1", "OLD-2"]
    ds.AccessionNumber = "ACC99"
    ds.save_as(tmp_path / "x.dcm")
    back = pydicom.dcmread(tmp_path / "x.dcm", stop_before_pixels=True)
    ids = identifiers_from_dataset(back)
    assert set(ids) == {"CANARY^ZEBRA", "PID-7731", "OLD-1", "OLD-2", "ACC99"}
    register_identifiers(ids)
    assert scrub(f"{back.PatientID} {back.AccessionNumber} {back.PatientName}") == \
        " ".join([REDACTED] * 3)


def test_phi_keywords_cover_the_design_list_and_are_real_keywords():
    assert {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
            "OtherPatientIDs"} <= PHI_KEYWORDS
    for kw in PHI_KEYWORDS:
        assert pydicom.datadict.tag_for_keyword(kw) is not None, kw


# --- logging -------------------------------------------------------------------------------------

def test_scrub_filter_on_log_records_and_exceptions():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter())
    log = logging.getLogger("test_privacy.filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        register_identifiers(["PID-7731"])
        log.warning("cannot read %s of %s", "DOE^JANE", "PID-7731")
        try:
            raise ValueError("bad value for DOE^JANE")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "DOE" not in text and "JANE" not in text and "7731" not in text
    assert "cannot read" in text and "ValueError" in text


def test_install_log_scrubber_catches_pydicom_warnings():
    # start without warning capture: a CLI run earlier in the session (`mediqa score` installs the
    # scrubber) leaves it on, and captureWarnings(True) then keeps pytest's own recorder in place
    logging.captureWarnings(False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        flt = install_log_scrubber()
        assert install_log_scrubber() is flt  # idempotent
        assert sum(isinstance(f, ScrubFilter) for f in handler.filters) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            ds = Dataset()
            ds.PatientAge = "45 years"            # pydicom warns with the raw value
            ds.PatientName = "CANARY^ZEBRA" * 6   # and about the over-long name
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)
    text = stream.getvalue()
    assert "Invalid value for VR AS" in text
    assert "45 years" not in text and "CANARY" not in text
