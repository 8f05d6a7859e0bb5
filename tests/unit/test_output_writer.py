"""core/outputs.py: the one writer of the files the project writes for a user.

The table is generated from the rules, not from examples: every writer the project has (WRITERS: the
report's files as bench/report `out_files` lists them, the tuned preset, the describe plot) x every
hostile kind of target (HOSTILE) is refused in one line by the check that runs before the work and by
the write itself, and leaves the target and everything outside the output path as it was; `force`
replaces only a foreign regular file. A full disk, a quota, a read-only file system (simulated: fsync
raising the errno) is one line, the old file intact, no temp file. And a scan of the source proves
that no other code writes a user's file (a new writer that bypasses core/outputs.py fails it by name).
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import report as R
from bench.tuning import presets
from fedeq_bench.core import outputs
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import describe
from tests.unit.test_tuned_presets import Outcome, cfg

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def tiny_ds():
    """What plot_label_distribution reads of a FederatedDataset: 4 clients, 3 classes."""
    rng = np.random.default_rng(0)
    clients = [SimpleNamespace(train_y=rng.integers(0, 3, 10), val_y=rng.integers(0, 3, 2)) for _ in range(4)]
    return SimpleNamespace(clients=clients, num_classes=3, name="tiny", partition="iid")


# -- every writer: (relative path under the output folder, check(out, path, force), write(out, path, force)) ---

def _report_member(rel: str):
    def files(out):
        return R.out_files(str(out), figures=[rel.split("/", 1)[1]] if rel.startswith("figures/") else [])

    def content(path):  # what the report writes there: its own header, or a matplotlib figure
        return {"report.md": b"# Report: x\n", "index.html": b"<title>x: fedeq-bench report</title>"}.get(
            os.path.basename(path), b"<svg><!-- Matplotlib v3 --></svg>")

    def check(out, path, force):
        R.check_out(str(out), force, figures=[rel.split("/", 1)[1]] if rel.startswith("figures/") else [])

    def write(out, path, force):
        what, owns = files(out)[str(path)]
        outputs.write(path, content(str(path)), what, owns, force=force, root=out)
    return check, write


def _preset_check(out, path, force):
    presets.check_out(str(path), force)


def _preset_write(out, path, force):
    presets.write(cfg(), [Outcome("fedeq", {"fedeq.rho": 0.1})], str(path), force)


def _plot_check(out, path, force):
    describe.check_output_path(path, force)


def _plot_write(out, path, force):
    describe.plot_label_distribution(tiny_ds(), path, force)


WRITERS = {
    **{f"report {rel}": (rel, *_report_member(rel))
       for rel in ("report.md", "index.html", "figures/g-acc.svg", "figures/g-optuna.png")},
    "tuned preset": ("synthetic.toml", _preset_check, _preset_write),
    "describe --plot": ("labels.png", _plot_check, _plot_write),
}
assert {os.path.relpath(p, "o") for p in R.out_files("o", ["g-acc.svg"])} <= {w[0] for w in WRITERS.values()}


# -- every hostile kind of target: make(target, outside) -> a description checked unchanged afterwards ---

def _fifo(target, outside):
    os.mkfifo(target)


def _device(target, outside):
    if not IS_ROOT:
        pytest.skip("making a character device node (os.mknod) needs root")
    os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null


def _link_to_file(target, outside):
    os.symlink(outside / "theirs.txt", target)


def _planted_folder_link(target, outside):
    """The folder the file goes into, below the output folder, is a link to a folder outside it."""
    os.rmdir(target.parent)
    os.symlink(outside, target.parent)


def _foreign(target, outside):
    target.write_bytes(b"someone else's file\n")


def _folder(target, outside):
    target.mkdir()
    (target / "inside.txt").write_bytes(b"kept")


HOSTILE = {"fifo": _fifo, "device": _device, "link to a file outside": _link_to_file,
           "link planted inside the output folder": _planted_folder_link, "foreign file": _foreign,
           "folder": _folder}
FORCE_REPLACES = {"foreign file"}


def snapshot(top: Path) -> dict:
    """Every entry under `top`, links not followed: its kind and (for a file) its bytes, (a link) its target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, top)] = (stat.S_IFMT(st.st_mode), os.readlink(p) if stat.S_ISLNK(st.st_mode)
                                             else open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None)
    return out


def members():
    for wname, (rel, _, _) in WRITERS.items():
        for hname in HOSTILE:
            if hname == "link planted inside the output folder" and "/" not in rel:
                continue  # the file goes directly into the folder the user gave: the link kinds are the target's
            for force in (False, True):
                yield pytest.param(wname, hname, force, id=f"{wname}-{hname}-{'force' if force else 'plain'}")


@pytest.mark.parametrize("writer,hostile,force", list(members()))
def test_every_writer_refuses_every_hostile_target_in_one_line_and_changes_nothing(tmp_path, writer, hostile, force):
    rel, check, write = WRITERS[writer]
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "theirs.txt").write_bytes(b"not yours\n")
    target = out / rel
    target.parent.mkdir(parents=True)
    HOSTILE[hostile](target, outside)
    before = snapshot(tmp_path)
    if force and hostile in FORCE_REPLACES:
        check(out, target, force)
        write(out, target, force)
        assert target.is_file() and not target.is_symlink() and target.read_bytes() != b"someone else's file\n"
        changed = {k for k in set(before) | set(snapshot(tmp_path)) if before.get(k) != snapshot(tmp_path).get(k)}
        assert changed == {os.path.relpath(target, tmp_path)}  # that file and nothing else
        return
    for step in (check, write):  # refused before the work, and by the write itself
        with pytest.raises(BenchError) as e:
            step(out, target, force)
        msg = str(e.value)
        assert "\n" not in msg and str(target.parent if "planted" in hostile else target) in msg, msg
        if hostile == "foreign file":
            assert "--force" in msg or "remove it" in msg, msg
    assert snapshot(tmp_path) == before  # the FIFO, device, link and its target, the file, the folder: as they were


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_is_one_line_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, writer, code):
    rel, check, write = WRITERS[writer]
    out = tmp_path / "out"
    target = out / rel
    target.parent.mkdir(parents=True)  # describe --plot writes only into a folder that exists
    write(out, target, False)  # a previous output of its own
    old = target.read_bytes()

    def full(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(BenchError) as e:
        write(out, target, False)
    msg = str(e.value)
    assert "\n" not in msg and f"({errno.errorcode[code]})" in msg and str(target) in msg, msg
    assert target.read_bytes() == old
    assert [n for n in os.listdir(target.parent) if n.endswith(".tmp")] == []


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "a.txt"
    owns = outputs.starts_with(b"mine")
    outputs.write(target, b"mine 1", "thing", owns)

    def half(f):
        f.write(b"mine 2, half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(BenchError, match=r"^cannot write the thing '.*a\.txt': no space left on the device \(ENOSPC\)"):
        outputs.write(target, half, "thing", owns)
    assert target.read_bytes() == b"mine 1" and os.listdir(tmp_path) == ["a.txt"]


def test_its_own_output_is_replaced_without_force(tmp_path):
    """The other half of `owns`: a rerun replaces what the writer wrote before (the tuned preset merges)."""
    for writer, (rel, check, write) in WRITERS.items():
        out = tmp_path / writer.replace(" ", "_")
        (out / rel).parent.mkdir(parents=True)
        write(out, out / rel, False)
        check(out, out / rel, False)
        write(out, out / rel, False)


def test_the_internal_atomic_write_never_replaces_a_link(tmp_path):
    (tmp_path / "real").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(OSError) as e:
        outputs.atomic_write(tmp_path / "link", lambda f: f.write(b"y"))
    assert e.value.errno == errno.ELOOP
    assert os.path.islink(tmp_path / "link") and (tmp_path / "real").read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


# -- no writer bypasses core/outputs.py ---------------------------------------------------------------

ANY_RECEIVER = {"write_text", "write_bytes", "savefig"}
MODULE_CALLS = {"os.replace", "os.rename", "os.symlink", "os.link", "np.savez", "np.savez_compressed", "np.save",
                "torch.save", "tempfile.mkstemp", "shutil.copy", "shutil.copyfile", "shutil.copy2", "shutil.move",
                "shutil.copytree"}
"""Calls that make or replace a file; `open` counts with a mode that writes."""


def write_calls(source: str) -> list[int]:
    """Line numbers of the calls in `source` that write a file (the code, not its docstrings)."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        dotted = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else name
        mode = None
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        if name in ANY_RECEIVER or dotted in MODULE_CALLS or (
                isinstance(mode, ast.Constant) and re.search(r"[wax+]", str(mode.value))):
            lines.append(node.lineno)
    return lines


INTERNAL = {
    # file: the write calls there that are not a user's file, and why
    "core/outputs.py": "the writer itself",
    "datasets/cache.py": "np.savez into outputs.atomic_write (the partition cache)",
    "datasets/describe.py": "savefig into outputs.write's file object",
    "bench/report/figures.py": "savefig into an in-memory buffer",
    "bench/tuning/pareto.py": "savefig into a TemporaryDirectory, then logged as an MLflow artifact",
    "bench/tracking/stores.py": "the lock file beside a SQLite store (opened for append, never written)",
    "bench/loop/store.py": "torch.save of client states into the run's own temporary folder",
    "bench/perf/workloads.py": "np.savez of a benchmark's data into its own temporary folder",
}


def test_no_code_writes_a_users_file_except_through_core_outputs():
    found = {}
    for top in ("bench", "core", "datasets", "methods"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            text = path.read_text()
            for i in write_calls(text):
                found.setdefault(rel, []).append(f"{i}: {text.splitlines()[i - 1].strip()}")
    unexpected = {k: v for k, v in found.items() if k not in INTERNAL}
    assert unexpected == {}, f"route these writes through core/outputs.py (or list why they are internal): {unexpected}"
    assert sorted(INTERNAL) == sorted(found)  # the list says why for each file that writes, and no more


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path):
    """/proc is a folder root may 'write' by access(2), but no folder can be made in it: the check makes
    (and removes) one there, so the refusal comes before the work, not from the first write after it."""
    from fedeq_bench.core.errors import BenchError

    with pytest.raises(BenchError, match=r"--report-dir '/proc/fedeq-bench-x': no folder can be made in '/proc'"):
        outputs.check_dir("/proc/fedeq-bench-x", "--report-dir")
    later = tmp_path / "a" / "b"
    assert outputs.check_dir(str(later), "--out") == str(later)
    assert os.listdir(tmp_path) == []  # the probe folder is gone, and nothing was made
