"""The batch runner: input expansion, errors that don't stop the batch, manifest, resume."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from facepriv.core.batch import ItemResult, Manifest, collect_inputs, run_batch
from facepriv.core.errors import ConfigError, ImageLoadError
from facepriv.core.io import load_image, save_image


def _tree(tmp_path):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ["x.jpg", "a/y.png", "a/b/z.jpeg", ".hidden/h.jpg", "a/notes.txt", "a/b/raw.JPG"]:
        (root / rel).write_bytes(b"x")
    return root


def test_collect_folder_mirrors_tree_and_skips_hidden(tmp_path):
    root = _tree(tmp_path)
    items = collect_inputs([root])
    rels = sorted(str(i.rel) for i in items)
    assert rels == ["a/b/raw.JPG", "a/b/z.jpeg", "a/y.png", "x.jpg"]
    assert all(i.path.is_absolute() for i in items)
    assert sorted(str(i.rel) for i in collect_inputs([root], glob="*.jpg")) == ["x.jpg"]
    assert sorted(str(i.rel) for i in collect_inputs([root], recursive=False)) == ["x.jpg"]


def test_collect_list_file_multi_args_and_exclude(tmp_path):
    root = _tree(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{root / 'x.jpg'}\nin/a/y.png\n\n")
    items = collect_inputs([f"@{lst}"])
    assert [i.path.name for i in items] == ["x.jpg", "y.png"]
    assert collect_inputs([lst])[1].path == (root / "a" / "y.png").resolve()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jpg").write_bytes(b"x")
    multi = collect_inputs([root, other])
    assert {str(i.rel) for i in multi} >= {"in/x.jpg", "other/x.jpg"}  # no collision
    out = root / "a"
    (out / "manifest.jsonl").write_text("")  # a facepriv output folder inside the input folder: left out
    assert all("a/" not in str(i.rel) for i in collect_inputs([root], exclude=[out]))
    with pytest.raises(ConfigError, match="does not exist"):
        collect_inputs([tmp_path / "missing"])


def _copy_process(item, dst):
    img = load_image(item.path)
    save_image(img, dst)
    return ItemResult(status="ok", output=dst, faces=1)


def test_run_batch_keeps_going_and_resumes(tmp_path, edge_cases):
    inp = tmp_path / "photos"
    inp.mkdir()
    for name in ["gps.jpg", "noface.png", "corrupt.jpg", "empty.jpg"]:
        shutil.copy(edge_cases[name], inp / name)
    out = tmp_path / "out"
    items = collect_inputs([inp])
    calls = []

    def process(item, dst):
        calls.append(item.path.name)
        return _copy_process(item, dst)

    s1 = run_batch(items, process, out_dir=out, config={"m": 1}, progress=False)
    assert s1.counts == {"ok": 2, "error": 2} and s1.exit_code == 1
    assert {os.path.basename(p) for p, _ in s1.failures} == {"corrupt.jpg", "empty.jpg"}
    rows = Manifest.read_all(out)
    assert len(rows) == 4 and all({"input", "output", "status", "faces", "timings", "error"} <= set(r) for r in rows)
    assert {r["status"] for r in rows} == {"ok", "error"}
    assert (out / "gps.jpg").exists() and (out / "noface.png").exists()
    # resume: only the failed files are tried again
    calls.clear()
    s2 = run_batch(items, process, out_dir=out, config={"m": 1}, resume=True, progress=False)
    assert sorted(calls) == ["corrupt.jpg", "empty.jpg"] and s2.resumed == 2
    # a changed setting means nothing counts as done
    calls.clear()
    run_batch(items, process, out_dir=out, config={"m": 2}, resume=True, progress=False)
    assert len(calls) == 4
    # a changed input or a deleted output is redone
    calls.clear()
    (out / "noface.png").unlink()
    shutil.copy(edge_cases["grey.png"], inp / "gps.jpg")
    run_batch(items, process, out_dir=out, config={"m": 2}, resume=True, progress=False)
    assert sorted(calls) == ["corrupt.jpg", "empty.jpg", "gps.jpg", "noface.png"]


def test_manifest_tolerates_a_cut_line(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.append({"input": "a", "status": "ok"})
    with open(m.path, "a") as f:
        f.write('{"input": "b", "sta')  # crash mid-line
    assert [r["input"] for r in Manifest.read_all(tmp_path)] == ["a"]


def test_sharding_writes_one_manifest_per_rank(tmp_path, edge_cases):
    inp = tmp_path / "photos"
    inp.mkdir()
    for i in range(5):
        shutil.copy(edge_cases["gps.jpg"], inp / f"p{i}.jpg")
    items = collect_inputs([inp])
    out = tmp_path / "out"
    seen = []
    for rank in range(2):
        run_batch(items, lambda it, d: (seen.append(it.path.name), _copy_process(it, d))[1], out_dir=out,
                  config={}, rank=rank, world_size=2, progress=False)
    assert sorted(seen) == sorted(f"p{i}.jpg" for i in range(5))  # each input exactly once
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    assert len(Manifest.read_all(out)) == 5


def test_interrupt_stops_cleanly(tmp_path, edge_cases):
    inp = tmp_path / "photos"
    inp.mkdir()
    for i in range(3):
        shutil.copy(edge_cases["gps.jpg"], inp / f"p{i}.jpg")
    items = collect_inputs([inp])

    def process(item, dst):
        if item.path.name == "p1.jpg":
            raise KeyboardInterrupt
        return _copy_process(item, dst)

    s = run_batch(items, process, out_dir=tmp_path / "out", config={}, progress=False)
    assert s.interrupted and s.exit_code == 130
    assert [json.loads(x)["input"].endswith("p0.jpg") for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()] == [True]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_load_error_type_is_faceprivs(edge_cases):
    with pytest.raises(ImageLoadError):
        load_image(edge_cases["text.jpg"])


# ----------------------------------------------------------------------------- outputs vs inputs
def _never_called(item, dst):
    raise AssertionError(f"processing started for {item.path} although the run must be refused")


def test_an_output_never_replaces_another_input_of_the_run(tmp_path, edge_cases):
    d = tmp_path / "D"
    d.mkdir()
    shutil.copy(edge_cases["gps.jpg"], d / "a.jpg")
    shutil.copy(edge_cases["noface.png"], d / "a.png")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    items = collect_inputs([d / "a.jpg", d / "a.png"])
    # a.jpg --format png --out D would replace the input a.png (and a.png itself)
    with pytest.raises(ConfigError, match="would overwrite the input"):
        run_batch(items, _never_called, out_dir=d, config={}, output_suffix=".png", progress=False)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # not even a manifest
    # the same through a folder input: D holds a.jpg and a.png, out is a sub-folder whose
    # mirror would be fine, but --format png maps both to one name
    with pytest.raises(ConfigError, match="same output"):
        run_batch(collect_inputs([d]), _never_called, out_dir=d / "out", config={}, output_suffix=".png",
                  progress=False)


def test_two_inputs_never_share_an_output_after_the_format_mapping(tmp_path, edge_cases):
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(edge_cases["gps.jpg"], d / "x.jpg")
    shutil.copy(edge_cases["noface.png"], d / "x.png")
    items = collect_inputs([d])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"two inputs map to the same output .*x\.png.*--format"):
        run_batch(items, _never_called, out_dir=out, config={}, output_suffix=".png", progress=False)
    assert not out.exists()
    # without the suffix mapping the names differ and the run goes ahead
    s = run_batch(items, lambda it, dst: _copy_process(it, dst), out_dir=out, config={}, progress=False)
    assert s.counts == {"ok": 2} and (out / "x.jpg").is_file() and (out / "x.png").is_file()


def test_writers_refuse_any_input_while_the_batch_runs(tmp_path, edge_cases):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("gps.jpg", "noface.png"):
        shutil.copy(edge_cases[name], d / name)
    items = collect_inputs([d])
    before = (d / "noface.png").read_bytes()

    def rogue(item, dst):  # a command that (wrongly) writes over another input
        save_image(load_image(item.path), d / "noface.png")
        return ItemResult(output=dst)

    s = run_batch(items, rogue, out_dir=tmp_path / "out", config={}, progress=False)
    assert s.failed == 2 and all("refusing to overwrite the input" in e for _, e in s.failures)
    assert (d / "noface.png").read_bytes() == before


# ----------------------------------------------------------------------------- --out vs input folders
def test_out_at_or_above_the_input_folder_excludes_nothing(tmp_path):
    root = _tree(tmp_path)  # tmp_path/in/...
    every = sorted(str(i.rel) for i in collect_inputs([root]))
    assert sorted(str(i.rel) for i in collect_inputs([root], exclude=[root])) == every
    assert sorted(str(i.rel) for i in collect_inputs([root], exclude=[tmp_path])) == every
    # strictly inside, a facepriv output folder (it has a manifest): only the files under it are skipped
    (root / "a" / "b" / "manifest.jsonl").write_text("")
    inside = sorted(str(i.rel) for i in collect_inputs([root], exclude=[root / "a" / "b"]))
    assert inside == ["a/y.png", "x.jpg"]


def test_out_equal_to_the_input_folder_is_refused_not_silently_empty(tmp_path, edge_cases):
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(edge_cases["gps.jpg"], d / "p.jpg")
    items = collect_inputs([d], exclude=[d])
    assert len(items) == 1
    with pytest.raises(ConfigError, match="would overwrite the input"):
        run_batch(items, _never_called, out_dir=d, config={}, progress=False)
    # into the parent folder: processed, written beside the input folder
    s = run_batch(collect_inputs([d], exclude=[tmp_path]), _copy_process, out_dir=tmp_path, config={},
                  progress=False)
    assert s.counts == {"ok": 1} and (tmp_path / "p.jpg").is_file()


def test_an_empty_input_set_is_a_usage_error(tmp_path):
    root = _tree(tmp_path)
    items = collect_inputs([root], glob="*.nothing")
    assert items == []
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no input files to process"):
        run_batch(items, _never_called, out_dir=out, config={}, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- manifest rows, summary
def test_manifest_rows_carry_the_run_id_and_start(tmp_path, edge_cases):
    inp = tmp_path / "photos"
    inp.mkdir()
    for name in ("gps.jpg", "noface.png", "corrupt.jpg"):
        shutil.copy(edge_cases[name], inp / name)
    items = collect_inputs([inp])
    out = tmp_path / "out"
    s1 = run_batch(items, _copy_process, out_dir=out, config={}, progress=False)
    s2 = run_batch(items, _copy_process, out_dir=out, config={}, resume=True, progress=False)
    rows = Manifest.read_all(out)
    assert len(rows) == 4  # 3 from the first run, the failed one again in the second
    assert {r["run_id"] for r in rows[:3]} == {s1.run_id} and rows[3]["run_id"] == s2.run_id != s1.run_id
    assert all(r["run_started"] for r in rows) and s2.resumed == 2
    assert s2.to_json()["run_id"] == s2.run_id
    s3 = run_batch(items[:1], _copy_process, out_dir=tmp_path / "o3", config={}, progress=False, run_id="job-7")
    assert Manifest.read_all(tmp_path / "o3")[0]["run_id"] == "job-7" == s3.run_id


def test_summary_counts_files_copied_because_no_face_was_found(tmp_path, edge_cases):
    inp = tmp_path / "photos"
    inp.mkdir()
    for name in ("gps.jpg", "noface.png", "grey.png"):
        shutil.copy(edge_cases[name], inp / name)

    def process(item, dst):
        res = _copy_process(item, dst)
        if item.path.name != "gps.jpg":
            res.status, res.faces, res.extra = "copied", 0, {"reason": "no face"}
        return res

    s = run_batch(collect_inputs([inp]), process, out_dir=tmp_path / "out", config={}, progress=False)
    assert s.counts == {"ok": 1, "copied": 2} and s.copied_without_face == 2
    assert s.to_json()["no_face"] == {"copied": 2} and s.exit_code == 0
