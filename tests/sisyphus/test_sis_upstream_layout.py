"""A recipe collection in the reference Sisyphus layout (tests/sisyphus/sis_setups/upstream_layout: recipe/demo_pkg/ imported
as demo_pkg.x, a settings.py written for upstream), run end to end by `sis m -r`: setup_path(__package__) as
i6_core uses it, set_vis_name, join_right, DelayedFormat, Variable arithmetic, Job.sh, add_input in update(), tk.block, Task(tries=2),
ALIAS_AND_OUTPUT_SUBDIR keeping two configs apart, and JOB_AUTO_CLEANUP packing finished job folders."""
import os
import shutil
import tarfile

from sis_util import run_sis
from test_sis_hash import base62_of_sha256
from test_sis_upstream_api import dict_bytes, job_output, s

SETUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sis_setups", "upstream_layout")


def test_upstream_layout_collection_runs_end_to_end(tmp_path):
    setup = tmp_path / "setup"
    shutil.copytree(SETUP, setup)
    result = run_sis(str(setup), "m", "-r", "config/demo.py", "config/other.py", extra_env={"DEMO_SETUP": str(setup)},
                     timeout=300)
    assert result.returncode == 0, result.output

    numbers_id = "demo_pkg/numbers/WriteNumbers." + base62_of_sha256(dict_bytes({"count": b"(int, 5)"}))
    total = job_output(numbers_id, "total")
    text = b"(DelayedFormat, " + dict_bytes({"string": s("total={}"), "args": b"(tuple, " + total + b")",
                                             "kwargs": b"(dict)"}) + b")"
    times_two = b"(DelayedMul, " + dict_bytes({"a": total, "b": b"(int, 2)"}) + b")"
    number = b"(DelayedAdd, " + dict_bytes({"a": times_two, "b": b"(int, 1)"}) + b")"
    describe_id = "demo_pkg/numbers/Describe." + base62_of_sha256(dict_bytes({"text": text, "number": number}))
    work = setup / "work"
    assert (work / numbers_id).is_dir() and (work / describe_id).is_dir()

    out = setup / "output"
    assert (out / "demo" / "numbers.txt").read_text() == "1\n2\n3\n4\n5\n"
    assert (out / "other" / "numbers.txt").read_text() == "1\n2\n3\n"
    assert (out / "demo" / "description.txt").read_text() == "total=15; number=31; greeting=hello from settings\n"
    assert (out / "demo" / "collected.txt").read_text() == "content 0\ncontent 1\ncontent 2\n"
    assert (out / "demo" / "flaky.txt").read_text() == "second try\n"
    assert (out / "demo" / "word_count").read_text() == "3\n"
    words = b"(Path, (tuple, (NoneType), " + s("demo_pkg/data/words.txt") + b"))"  # setup_path: hashed by package
    assert (work / ("demo_pkg/numbers/CountLines." + base62_of_sha256(dict_bytes({"text": words})))).is_dir()
    assert os.path.realpath(setup / "alias" / "demo" / "numbers") == str(work / numbers_id)
    other_alias = os.path.realpath(setup / "alias" / "other" / "numbers")
    assert other_alias.startswith(str(work / "demo_pkg/numbers/WriteNumbers."))
    assert not (setup / "alias" / "numbers").exists() and not (out / "numbers.txt").exists()

    # JOB_AUTO_CLEANUP (upstream default): finished folders hold output/, info and finished.tar.gz only.
    flaky = next((work / "demo_pkg" / "numbers").glob("Flaky.*"))
    assert sorted(p.name for p in flaky.iterdir()) == ["finished.tar.gz", "info", "output"]
    with tarfile.open(flaky / "finished.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"finished", "job.save", "log.run.1", "log.run.1.error.01", "error.run.1.01"} <= names

    # Upstream's module path rule: a leading `recipe.` is not part of the id, so both import styles give one job.
    code = ("import recipe.demo_pkg.numbers as a, demo_pkg.numbers as b; "
            "print(a.WriteNumbers(5).job_id() == b.WriteNumbers(5).job_id() == %r)" % numbers_id)
    same = run_sis(str(setup), "console", "-c", code, "config/demo.py")
    assert same.returncode == 0 and same.stdout.strip().endswith("True"), same.output

    rerun = run_sis(str(setup), "m", "-r", "config/demo.py", "config/other.py", extra_env={"DEMO_SETUP": str(setup)})
    assert rerun.returncode == 0, rerun.output
    assert "submit" not in rerun.output
