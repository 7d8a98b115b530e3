import os
from pathlib import Path

import pytest

from training.files import copy_folder, replacing_file, replacing_folder, write_text


def test_replacing_folder_puts_the_new_folder_in_place_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with replacing_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert list(tmp.iterdir()) == []
        assert (target / "old.txt").read_text() == "old"  # untouched while the new one is written
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sub", "sub/new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_replacing_folder_creates_a_missing_target_and_its_parents(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    with replacing_folder(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_an_error_while_writing_leaves_the_old_folder_as_it_was(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing_folder(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_error_while_writing_a_new_target_leaves_no_target(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with replacing_folder(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_replacing_folder_refuses_a_file(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with replacing_folder(tmp_path / "model"):
            pass
    assert (tmp_path / "model").read_text() == "a file"


def test_copy_folder_replaces_the_destination_with_a_copy(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "w.safetensors").write_bytes(b"\x00\x01")
    (src / "skip.log").write_text("log")
    dst.mkdir()
    (dst / "stale").write_text("stale")
    copy_folder(src, dst, ignore=lambda folder, names: [n for n in names if n.endswith(".log")])
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*")) == ["d", "d/w.safetensors"]
    assert (dst / "d" / "w.safetensors").read_bytes() == b"\x00\x01"
    assert (src / "skip.log").is_file()


def test_copy_folder_of_a_missing_source_fails_clearly_and_keeps_the_destination(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("1")
    with pytest.raises(NotADirectoryError, match="missing"):
        copy_folder(tmp_path / "missing", tmp_path / "dst")
    assert (tmp_path / "dst" / "keep").read_text() == "1"


def test_write_text_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "job.json"
    assert write_text(target, "first\n") == target and target.read_text() == "first\n"
    write_text(target, "second")
    assert target.read_text() == "second" and [p.name for p in target.parent.iterdir()] == ["job.json"]


def test_an_error_while_writing_a_file_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"), replacing_file(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_replacing_file_refuses_a_folder_and_a_block_that_wrote_nothing(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_text(tmp_path / "dir", "x")
    target = tmp_path / "f.txt"
    target.write_text("kept")
    with pytest.raises(FileNotFoundError, match="nothing was written"), replacing_file(target):
        pass
    assert target.read_text() == "kept"


def test_two_writers_of_one_file_write_to_different_paths(tmp_path):
    target = tmp_path / "stages.json"
    with replacing_file(target) as a, replacing_file(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer block finished last


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).name.endswith(".tmp"):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr("training.files.os.replace", replace)
    with pytest.raises(OSError, match="disk gone"), replacing_folder(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
