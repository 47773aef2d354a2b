"""Outputs never destroy the user's data: modelmerge.atomic's guard and one-step replacement, the merge and
trim programs refusing outputs that are (or hold, or lie inside) inputs or that they did not write, stale
temporaries of killed runs removed, and merges killed (SIGKILL) while writing a few hundred MB."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge as merge_program
import trim as trim_program
from modelmerge import atomic
from modelmerge.atomic import MARKER, OutputError, atomic_dir, atomic_file, claim_output
from modelmerge.merging.cli import run_cli
from sis_util import REPO


def tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def write_dir(target, content, **guard):
    with atomic_dir(str(target), **guard) as tmp:
        with open(os.path.join(tmp, "data"), "w") as f:
            f.write(content)


# --- the guard and the replacement ------------------------------------------------------------------

def test_an_output_of_the_same_kind_is_replaced_and_marked(tmp_path):
    out = tmp_path / "out"
    write_dir(out, "first", kind="merge")
    write_dir(out, "second", kind="merge")
    assert (out / "data").read_text() == "second" and (out / MARKER).exists()
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("existing", ["folder", "file", "other kind", "link"])
def test_anything_else_at_the_output_is_refused_and_kept_unless_overwrite(tmp_path, existing):
    out = tmp_path / "out"
    if existing == "folder":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    elif existing == "file":
        out.write_text("mine")
    elif existing == "other kind":
        write_dir(out, "mine", kind="trimmed task vector")
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "thesis.tex").write_text("mine")
        out.symlink_to(tmp_path / "real")
    before = {name: tree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).read_bytes()
              for name in os.listdir(tmp_path)}
    with pytest.raises(OutputError, match=f"output {out} exists and is .*only replaced when asked to overwrite it"):
        write_dir(out, "new", kind="merge")
    after = {name: tree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).read_bytes()
             for name in os.listdir(tmp_path)}
    assert after == before
    write_dir(out, "new", kind="merge", overwrite=True)
    assert (out / "data").read_text() == "new" and not out.is_symlink()
    if existing == "link":
        assert (tmp_path / "real" / "thesis.tex").read_text() == "mine"  # the link is replaced, not its target
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + (["real"] if existing == "link" else []))


def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused_even_with_overwrite(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    for out, inputs, why in [(model, [str(model)], "is the input"),
                             (tmp_path, [str(model / "model.safetensors")], "holds the input"),
                             (model / "merged", [str(model)], "lies inside the input")]:
        with pytest.raises(OutputError, match=why):
            write_dir(out, "new", kind="merge", inputs=inputs, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(OutputError, match="is the input"):
        write_dir(link, "new", kind="merge", inputs=[str(model)], overwrite=True)
    assert tree(model) == {"model.safetensors": b"weights"}


def test_a_file_output_knows_its_kind_through_written_by(tmp_path):
    out = tmp_path / "merged.safetensors"
    out.write_text("user's")

    def kind_of(path):
        return "merge" if open(path).read().startswith("merge") else None

    with pytest.raises(OutputError):
        with atomic_file(str(out), kind="merge", written_by=kind_of) as tmp:
            open(tmp, "w").write("merge 1")
    assert out.read_text() == "user's"
    with atomic_file(str(out), kind="merge", written_by=kind_of, overwrite=True) as tmp:
        open(tmp, "w").write("merge 1")
    with atomic_file(str(out), kind="merge", written_by=kind_of) as tmp:
        open(tmp, "w").write("merge 2")
    assert out.read_text() == "merge 2" and os.listdir(tmp_path) == ["merged.safetensors"]


def test_an_empty_folder_holds_nothing_to_lose_and_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_dir(out, "new", kind="merge")
    assert (out / "data").read_text() == "new"


def test_without_a_kind_anything_is_replaced_as_before(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    write_dir(out, "new")
    assert os.listdir(out) == ["data"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_is_one_exchange_and_the_old_one_is_removed(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out"
    write_dir(out, "old", kind="merge")
    calls = []
    real = atomic._exchange

    def recording(a, b):
        calls.append((a, b))
        if not exchange:
            return False
        done = real(a, b)
        # Right after the exchange: the new output is complete at its place, the old one under the temporary name.
        assert (out / "data").read_text() == "new" and open(os.path.join(a, "data")).read() == "old"
        return done

    monkeypatch.setattr(atomic, "_exchange", recording)
    write_dir(out, "new", kind="merge")
    assert len(calls) == 1 and (out / "data").read_text() == "new" and os.listdir(tmp_path) == ["out"]


def test_a_failure_while_writing_keeps_the_old_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "out"
    write_dir(out, "old", kind="merge")
    with pytest.raises(RuntimeError):
        with atomic_dir(str(out), kind="merge") as tmp:
            open(os.path.join(tmp, "data"), "w").write("half")
            raise RuntimeError("killed")
    assert (out / "data").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_stale_temporaries_of_dead_runs_are_removed_and_live_or_foreign_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic._host()
    names = {
        f".out.tmp-{host}-{dead.pid}-abc_12": False,  # a killed run of this host: removed
        ".out.tmp-a1b2c3d4": False,  # an older version's temporary
        ".out.tmp-old-a1b2c3d4": False,  # an older version's moved-aside output
        f".out.tmp-{host}-{os.getppid()}-xyz": True,  # a live process
        f".out.tmp-otherhost-{dead.pid}-abc": True,  # another host's: it may be running
        ".out.tmp-notes-of-mine": True,  # not a temporary of ours
        ".other.tmp-a1b2c3d4": True,  # another output's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_text("x")
    claim_output(str(tmp_path / "out"), "merge")
    atomic.release_output(str(tmp_path / "out"))  # the claim holds the output's lock until then
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, kept in names.items() if kept)


# --- the programs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=generator), "b": torch.randn(30, generator=generator)}
    paths = []
    for i in range(3):
        folder = root / f"m{i}"
        folder.mkdir()
        save_file({n: t + 0.1 * i for n, t in base.items()}, folder / "model.safetensors")
        paths.append(str(folder))
    return paths


def run_merge(argv):
    return run_cli(merge_program.main, argv + ["--no_progress"])


def fails(argv, message, capsys, main=merge_program.main):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith("error:") and message in lines[-1], lines
    return lines[-1]


def test_merge_refuses_inputs_and_user_files_as_output_and_reruns_over_its_own(small, tmp_path, capsys):
    base, a, b = small
    before = {path: tree(path) for path in small}
    ta = ["--merge", "task_arithmetic", "--ancestor", base, "--models", a, b, "--no_progress"]
    for out, why in [(a, "is the input"), (base, "is the input"), (os.path.dirname(a), "holds the input"),
                     (os.path.join(a, "merged"), "lies inside the input"),
                     (os.path.join(a, "model.safetensors"), "lies inside the input")]:
        fails(ta + ["--output", out, "--overwrite"], why, capsys)
    assert {path: tree(path) for path in small} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    fails(ta + ["--output", str(mine)], "exists and is not an output of this program", capsys)
    assert tree(mine) == {"notes.txt": b"mine"}
    out = str(tmp_path / "out")
    run_merge(ta + ["--output", out])
    first = load_file(os.path.join(out, "model.safetensors"))
    run_merge(ta + ["--output", out, "--x:merge_lambda", "0.5"])  # its own output: replaced
    assert not torch.equal(load_file(os.path.join(out, "model.safetensors"))["w"], first["w"])
    bare = tmp_path / "bare.safetensors"
    bare.write_text("a user's file")
    fails(ta + ["--output", str(bare)], "exists and is not an output", capsys)
    assert bare.read_text() == "a user's file"
    run_merge(ta + ["--output", str(bare), "--overwrite"])
    run_merge(ta + ["--output", str(bare)])  # a merge wrote it: replaced without --overwrite
    assert set(load_file(bare)) == {"w", "b"}
    trim_out = str(tmp_path / "trimmed")
    run_cli(trim_program.main, ["--model", a, "--ancestor", base, "--density", "0.5", "--output", trim_out])
    fails(ta + ["--output", trim_out], "written as 'trimmed task vector'", capsys)
    fails(["--model", a, "--ancestor", base, "--density", "0.5", "--output", out], "written as 'merge'", capsys,
          trim_program.main)
    fails(["--model", a, "--ancestor", base, "--density", "0.5", "--output", a], "is the input", capsys,
          trim_program.main)
    assert sorted(os.listdir(tmp_path)) == ["bare.safetensors", "mine", "out", "trimmed"]


# --- kills while writing ------------------------------------------------------------------------------

ROWS, COLUMNS, TENSORS = 4096, 4096, 4  # 4 tensors of 64 MiB: a 256 MiB model, three of them as inputs


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    paths = []
    for i in range(3):
        generator = torch.Generator().manual_seed(i)
        folder = root / f"m{i}"
        folder.mkdir()
        save_file({f"layer{j}.weight": torch.randn(ROWS, COLUMNS, generator=generator) for j in range(TENSORS)},
                  folder / "model.safetensors")
        paths.append(str(folder))
    return paths


def temporaries(parent):
    return [name for name in os.listdir(parent) if ".tmp-" in name]


def written_bytes(parent):
    return sum(os.path.getsize(os.path.join(root, name)) for tmp in temporaries(parent)
               for root, _, files in os.walk(os.path.join(parent, tmp)) for name in files)


@pytest.mark.slow
def test_a_merge_killed_while_writing_leaves_the_old_or_nothing_and_the_rerun_completes(large, tmp_path):
    """SIGKILL at several points of the write (temporary just made, a third and two thirds written,
    right after it is complete): the output is never partial, and a rerun leaves the complete output and
    nothing else in the folder."""
    base, a, b = large
    out_dir = tmp_path / "work"
    out_dir.mkdir()
    out = out_dir / "merged"
    command = [sys.executable, os.path.join(REPO, "code", "merge.py"), "--merge", "task_arithmetic", "--ancestor", base,
               "--models", a, b, "--output", str(out), "--no_progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "code"))
    total = ROWS * COLUMNS * 4 * TENSORS
    killed_mid_write = 0
    for point in (1, total // 3, 2 * total // 3, total):
        for _ in range(3):  # on a busy machine a run may get past the point before it is seen: try again
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while written_bytes(out_dir) < point and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            running = process.poll() is None
            process.send_signal(signal.SIGKILL)
            process.wait()
            if out.exists():  # only ever a complete output (of a run that got through)
                weights = load_file(out / "model.safetensors")
                assert sorted(weights) == [f"layer{j}.weight" for j in range(TENSORS)]
            if running or point == total:
                break
        if running and point < total:  # killed in the middle of the write: its temporary is left behind
            assert temporaries(out_dir), point
            killed_mid_write += 1
    assert killed_mid_write >= 2
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert os.listdir(out_dir) == ["merged"]
    assert sorted(os.listdir(out)) == sorted([MARKER, "model.safetensors"])
    merged = load_file(out / "model.safetensors")
    theta = [load_file(os.path.join(p, "model.safetensors"))["layer3.weight"] for p in (base, a, b)]
    torch.testing.assert_close(merged["layer3.weight"], theta[1] + theta[2] - theta[0])
