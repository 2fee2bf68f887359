"""Input collection says what it leaves out (unsupported files, GIFs wherever they come from),
and --out may never put outputs among the inputs (checked before any model loads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import fixture_path
from facepriv.cli import app
from facepriv.cli.common import hoist_global_options
from facepriv.core import progress
from facepriv.core.batch import check_outputs, collect_inputs, run_batch, unsupported_in_folders
from facepriv.core.errors import ConfigError
from facepriv.core.io import IMAGE_SUFFIXES, VIDEO_SUFFIXES

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, hoist_global_options(list(map(str, args))), env={"COLUMNS": "250"})


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(autouse=True)
def loud():
    """Warnings are printed unless quiet; tests start loud whatever ran before."""
    before = progress.is_quiet()
    progress.set_quiet(False)
    yield
    progress.set_quiet(before)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    shutil.copy(fixture_path("obama.jpg"), d / "a.jpg")
    shutil.copy(fixture_path("biden.jpg"), d / "sub" / "b.jpg")
    (d / "anim.gif").write_bytes(b"GIF89a")
    (d / "sub" / "still.gif").write_bytes(b"GIF89a")
    (d / "notes.txt").write_text("hello")
    (d / "manifest.jsonl").write_text("")  # facepriv's own: never worth a word
    (d / ".DS_Store").write_bytes(b"x")
    return d


def _never_called(item, dst):
    raise AssertionError("processing started although the run must be refused")


# ----------------------------------------------------------------------------- skipped files
def test_folder_collection_reports_unsupported_files_in_one_line(photos, capsys):
    skipped = []
    items = collect_inputs([str(photos)], skipped=skipped)
    assert sorted(str(i.rel) for i in items) == ["a.jpg", "sub/b.jpg"]
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("warning:") == 1
    assert f"skipped 3 files in {photos}/ that are not supported images (.gif x2, .txt x1)" in err
    assert "GIF is not supported" in err and "convert it to PNG" in err
    assert [(r.where, dict(r.suffixes)) for r in skipped] == [(str(photos), {".gif": 2, ".txt": 1})]


def test_a_gif_is_skipped_the_same_way_when_named_directly(photos, capsys):
    items = collect_inputs([photos / "a.jpg", photos / "anim.gif"])
    assert [i.path.name for i in items] == ["a.jpg"]
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped 1 file named directly (anim.gif): GIF is not supported" in err
    lst = photos.parent / "list.txt"
    lst.write_text(f"{photos / 'a.jpg'}\n{photos / 'sub' / 'still.gif'}\n")
    assert [i.path.name for i in collect_inputs([f"@{lst}"])] == ["a.jpg"]
    assert "still.gif" in capsys.readouterr().err


def test_only_gifs_named_is_a_usage_error_that_says_why(photos):
    with pytest.raises(ConfigError, match=r"no input files to process: skipped 1 file named directly \(anim\.gif\): "
                                          r"GIF is not supported"):
        collect_inputs([photos / "anim.gif"])


def test_only_unsupported_files_in_a_folder_is_a_usage_error_that_says_why(tmp_path):
    d = tmp_path / "gifs"
    d.mkdir()
    (d / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ConfigError, match=r"no input files to process: skipped 1 file in .*gifs/ that is not a "
                                          r"supported image \(\.gif x1\)"):
        collect_inputs([d])


def test_a_glob_or_quiet_mode_reports_nothing(photos, capsys):
    assert [i.path.name for i in collect_inputs([photos], glob="*.jpg")] == ["a.jpg", "b.jpg"]
    assert capsys.readouterr().err == ""
    progress.set_quiet(True)
    skipped = []
    collect_inputs([photos], skipped=skipped)
    assert capsys.readouterr().err == "" and skipped[0].count == 3


def test_other_named_files_are_still_taken_as_given(tmp_path):
    odd = tmp_path / "scan.jfif"
    odd.write_bytes(b"x")
    assert [i.path.name for i in collect_inputs([odd])] == ["scan.jfif"]


def test_unsupported_in_folders_counts_what_a_photo_and_video_command_leaves_out(photos):
    (photos / "clip.mp4").write_bytes(b"x")
    reps = unsupported_in_folders([photos], supported=IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    assert len(reps) == 1 and dict(reps[0].suffixes) == {".gif": 2, ".txt": 1}
    assert "are not supported images or videos" in reps[0].message()
    assert unsupported_in_folders([photos], supported=IMAGE_SUFFIXES, glob="*") == []


def test_deid_warns_about_the_files_it_leaves_out(photos, tmp_path, monkeypatch):
    import facepriv.models as models

    def no_models(*a, **k):
        raise AssertionError("no model may load in this test")

    monkeypatch.setattr(models, "create_model", no_models)
    # every file left is skipped: the warning, then the usage error, and no model loaded
    for f in ("a.jpg", "sub/b.jpg"):
        (photos / f).unlink()
    r = invoke("deid", photos, "--out", tmp_path / "out")
    assert r.exit_code == 2
    assert f"skipped 3 files in {photos}/ that are not supported images or videos (.gif x2, .txt x1)" in said(r)


# ----------------------------------------------------------------------------- --out vs the inputs
def test_out_at_the_input_folder_with_another_format_is_refused(photos):
    items = collect_inputs([photos], exclude=[photos])
    with pytest.raises(ConfigError, match="beside the inputs") as err:
        run_batch(items, _never_called, out_dir=photos, config={}, output_suffix=".png", progress=False)
    assert not list(photos.rglob("*.png")) and not (photos / "manifest.jsonl").read_text()
    msg = str(err.value)
    suggestion = msg.rsplit("e.g. ", 1)[1]
    assert Path(suggestion) == photos.parent / "photos-out"
    assert "--format" not in msg.split(";", 1)[1]  # no hint that another format would make it fine


def test_out_at_the_folder_of_a_named_file_with_another_format_is_refused(photos):
    items = collect_inputs([photos / "a.jpg"])
    with pytest.raises(ConfigError, match="beside the inputs"):
        check_outputs(items, photos, ".png")


def test_messages_never_suggest_an_out_folder_inside_the_inputs(photos):
    items = collect_inputs([photos], exclude=[photos])
    for suffix in (None, ".png"):
        with pytest.raises(ConfigError) as err:
            check_outputs(items, photos, suffix)
        msg = str(err.value)
        assert "another --format" not in msg
        if "e.g. " in msg:
            hint = Path(msg.rsplit("e.g. ", 1)[1])
            assert photos not in hint.parents and hint != photos


def test_out_above_the_input_folder_is_fine(photos, tmp_path):
    items = collect_inputs([photos], exclude=[tmp_path])
    planned = check_outputs(items, tmp_path, ".png")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in planned.values()) == ["a.png", "sub/b.png"]


def test_out_inside_the_input_folder_holding_photos_is_refused(photos):
    with pytest.raises(ConfigError, match=r"lies inside the input folder .* holds 1 photo\(s\) or video\(s\) that "
                                          r"facepriv did not write \(e\.g\. b\.jpg\)") as err:
        collect_inputs([photos], exclude=[photos / "sub"])
    assert str(photos.parent / "photos-out") in str(err.value)
    # a new or facepriv-written folder inside the inputs is fine, and left out of them
    assert [str(i.rel) for i in collect_inputs([photos], exclude=[photos / "new-out"])] == ["a.jpg", "sub/b.jpg"]
    (photos / "sub" / "manifest.jsonl").write_text("")
    assert [str(i.rel) for i in collect_inputs([photos], exclude=[photos / "sub"])] == ["a.jpg"]


def test_deid_out_at_the_input_folder_with_png_is_refused_before_any_model_loads(photos, monkeypatch):
    import facepriv.models as models

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the outputs were checked")

    monkeypatch.setattr(models, "create_model", no_models)
    before = sorted(p.name for p in photos.rglob("*"))
    r = invoke("deid", photos, "--out", photos, "--format", "png")
    assert r.exit_code == 2, r.output
    assert "beside the inputs" in said(r) and "photos-out" in said(r)
    assert sorted(p.name for p in photos.rglob("*")) == before
