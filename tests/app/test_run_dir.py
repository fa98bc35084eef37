"""The run folder is never lost (issue #14): a new run refuses a folder that holds a run (F1), one
``srigl train`` at a time writes a folder (F10), and ``--resume`` trusts the checkpoint's config,
never a ``config.toml`` that differs from it (F5)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from srigl.app import run_dir as run_dir_module
from srigl.app.cli import main
from srigl.app.config import TrainConfig
from srigl.app.run_dir import RUN_FILES, RunLock, claim_run_dir
from srigl.app.train import train
from srigl.errors import InvalidConfigError

QUICK = ["--data", "digits", "--epochs", "1", "--limit-train", "128", "--limit-test", "64", "--batch-size", "64",
         "--no-progress", "--delta", "2", "--method", "rigl"]


def _refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------ F1
@pytest.mark.parametrize("name", RUN_FILES)
def test_new_run_refuses_a_folder_that_holds_a_run(tmp_path, capsys, name):
    out = tmp_path / "run"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("the earlier run's file\n")
    err = _refused(capsys, ["train", *QUICK, "--out", str(out)])
    assert f"already holds a run ({name})" in err
    assert f"srigl train --resume {out}" in err and "--overwrite" in err
    assert (out / name).read_text() == "the earlier run's file\n"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted([Path(name).name, ".srigl.lock"])


def test_overwrite_replaces_the_run_and_leaves_none_of_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out), "--plot"]) == 0
    assert (out / "curves.png").is_file()
    assert main(["train", *QUICK, "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert "seed = 1" in (out / "config.toml").read_text()
    assert not (out / "curves.png").exists(), "--overwrite left the replaced run's plot"


def test_overwrite_and_resume_together_are_refused(finished, capsys):
    assert "--overwrite starts a new run and --resume continues one" in _refused(
        capsys, ["train", "--resume", str(finished), "--overwrite"])


def test_empty_out_and_an_existing_file_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "out must name a run folder, got ''" in _refused(capsys, ["train", *QUICK, "--out", ""])
    assert list(tmp_path.iterdir()) == []
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    assert "is an existing file; give --out a folder" in _refused(capsys, ["train", *QUICK, "--out", str(file)])
    assert file.read_text() == "keep me\n"


def test_an_unwritable_run_folder_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # Tests may run as root, which ignores permission bits: make the folder's first write fail instead.
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".srigl.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_dir_module.os, "open", read_only)
    err = _refused(capsys, ["train", *QUICK, "--out", str(tmp_path / "run")])
    assert f"cannot write into the run folder {str(tmp_path / 'run')!r}: Read-only file system" in err


# ----------------------------------------------------------------------------------------- F10
def test_a_second_train_on_a_locked_folder_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out)  # another process's lock: flock conflicts between open files, in one process too
    try:
        err = _refused(capsys, ["train", *QUICK, "--out", str(out)])
        assert f"another `srigl train` (pid {os.getpid()}) is using the run folder" in err
        assert not (out / "config.toml").exists()
    finally:
        held.release()
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    claim_run_dir(out, resume=True).release()  # the finished run released its lock


def test_the_lock_is_released_when_train_raises(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InvalidConfigError, match="nothing to resume"):
        train(TrainConfig(data="digits", limit_train=64, limit_test=64, epochs=1, out=str(out)), resume=True)
    claim_run_dir(out, resume=True).release()


# ------------------------------------------------------------------------------------------ F5
def test_resume_refuses_a_config_toml_that_differs_from_the_checkpoint(finished, capsys):
    toml = finished / "config.toml"
    original = toml.read_text()
    try:
        toml.write_text(original.replace("epochs = 1", "epochs = 5").replace('method = "rigl"', 'method = "set"'))
        err = _refused(capsys, ["train", "--resume", str(finished), "--no-progress"])
        assert "differs from the config in the checkpoint" in err and "['epochs', 'method']" in err
        assert "epochs: checkpoint 1, config.toml 5" in err
        toml.write_text("")  # what a crash during the old non-atomic rewrite left
        err = _refused(capsys, ["train", "--resume", str(finished), "--no-progress"])
        assert f"{toml} is empty; the checkpoint" in err and f"delete {toml} to resume" in err
        toml.write_bytes(b"\xff\xfe")
        err = _refused(capsys, ["train", "--resume", str(finished), "--no-progress"])
        assert "is not UTF-8 text" in err and f"delete {toml} to resume" in err
    finally:
        toml.write_text(original)


def test_resume_without_config_toml_uses_the_checkpoint_and_writes_it_again(finished, capsys):
    toml = finished / "config.toml"
    original = toml.read_text()
    toml.unlink()
    assert main(["train", "--resume", str(finished), "--no-progress"]) == 0
    assert toml.read_text() == original


def test_resume_does_not_rewrite_an_unchanged_config_toml(finished, capsys):
    toml = finished / "config.toml"
    before = toml.stat()
    assert main(["train", "--resume", str(finished), "--no-progress"]) == 0
    after = toml.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p.name for p in finished.iterdir() if p.name.endswith(".tmp")]


def test_python_api_resume_with_another_config_is_refused(finished):
    config = TrainConfig(data="digits", epochs=1, limit_train=128, limit_test=64, batch_size=64, delta=3,
                         method="rigl", progress=False, out=str(finished))
    with pytest.raises(InvalidConfigError, match=r"cannot resume .*last.pt with another config: delta: checkpoint 2, given 3"):
        train(config, resume=True)


def test_config_toml_is_written_atomically(tmp_path, capsys, monkeypatch):
    from srigl.io import atomic

    written = []
    real = atomic.atomic_write

    def spy(path, write, **kwargs):
        written.append(Path(path).name)
        return real(path, write, **kwargs)

    monkeypatch.setattr(atomic, "atomic_write", spy)
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    assert {"config.toml", "summary.json"} <= set(written)  # checkpoints: srigl.io.checkpoint, atomic too


def test_a_checkpoint_from_before_a_config_field_existed_still_resumes(tmp_path, capsys):
    import torch

    from srigl.io.checkpoint import save_checkpoint

    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["extra"]["config"]["sparse_init"]  # as written before the field was added
    save_checkpoint(path, state)
    (out / "config.toml").unlink()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path, capsys):
    import subprocess
    import sys

    import srigl

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom srigl.app.run_dir import claim_run_dir\n"
         f"lock = claim_run_dir({str(out)!r})\nprint('locked', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(srigl.__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _refused(capsys, ["train", *QUICK, "--out", str(out)])
        assert f"another `srigl train` (pid {holder.pid}) is using the run folder" in err
    finally:
        holder.kill()  # killed, not released: the kernel drops the lock with the process
        holder.wait()
    assert main(["train", *QUICK, "--out", str(out)]) == 0
