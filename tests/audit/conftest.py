"""Fixtures of the audit tests (plain helpers: ``helpers.py``, online API mocks: ``api_mocks.py``).

``tests/audit`` is a package (``__init__.py``), so this file is ``audit.conftest`` and
``from conftest import fixture_path`` still finds ``tests/conftest.py``.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import fixture_path

from .api_mocks import MockFacePP, random_jpeg
from .helpers import solid

API_ENV = ("FACEPP_API_KEY", "FACEPP_API_SECRET", "FACEPP_ENDPOINT", "FACEPRIV_API_CONFIG")


@pytest.fixture(autouse=True)
def _private_settings(tmp_path, monkeypatch):
    """Every audit test: calibrations go to a private folder, nothing is downloaded, and no API
    key or API config file of the machine is seen."""
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user API config file
    for var in API_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def online_empty_home(tmp_path, monkeypatch):
    """An empty model cache with downloads allowed (the offline switch off): what a first run sees."""
    monkeypatch.setenv("FACEPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FACEPRIV_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="session")
def real_models():
    from facepriv.models import create_model

    return {"dlib-resnet": create_model("dlib-resnet"), "sface": create_model("sface")}


@pytest.fixture
def photo_sets(tmp_path):
    """orig/: obama, obama2 and biden; gallery/: the same photos in obama/ and biden/ folders."""
    orig, gal = tmp_path / "orig", tmp_path / "gallery"
    orig.mkdir()
    for n in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copy(fixture_path(n), orig / n)
    (gal / "obama").mkdir(parents=True)
    (gal / "biden").mkdir(parents=True)
    shutil.copy(fixture_path("obama.jpg"), gal / "obama" / "o1.jpg")
    shutil.copy(fixture_path("obama2.jpg"), gal / "obama" / "o2.jpg")
    shutil.copy(fixture_path("biden.jpg"), gal / "biden" / "b1.jpg")
    return orig, gal


@pytest.fixture
def colour_crops(tmp_path):
    """Four aligned crops; the protected copies of a.png and b.png changed colour (their
    similarity to the original drops to 0.41), c.png and d.png are left as they were."""
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    for name, rgb in (("a.png", (200, 40, 40)), ("b.png", (40, 200, 40)), ("c.png", (40, 40, 200)),
                      ("d.png", (90, 90, 90))):
        solid(orig / name, rgb)
    solid(prot / "a.png", (40, 200, 40))
    solid(prot / "b.png", (200, 40, 40))
    solid(prot / "c.png", (40, 40, 200))
    solid(prot / "d.png", (90, 90, 90))
    return prot, orig


@pytest.fixture
def facepp_server():
    s = MockFacePP()
    yield s
    s.close()


@pytest.fixture
def images(tmp_path):
    """Five random JPEGs for the API mocks: alice1 and alice2 (one person), bob, carol, and empty
    (no face, once registered with ``register_identities``)."""
    files = {}
    for name, seed in (("alice1", 1), ("alice2", 2), ("bob", 3), ("empty", 4), ("carol", 5)):
        p = tmp_path / f"{name}.jpg"
        p.write_bytes(random_jpeg(seed))
        files[name] = p
    return files
