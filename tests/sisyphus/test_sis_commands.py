"""Command line and toolkit beyond the basic manager run: `sis console` (-c, stdin, the console helpers tk.run,
run_job, import_work_directory, remove_job_and_descendants), `sis m -i` and `--ui`, `--log_level N`,
`sis worker ... --force_resume`, cleanup (tk.cleaner: unused folders removed after a yes, never a running job's;
finished.tar.gz packing), reports, callbacks and held jobs, the default config (config.main), Task(update_rqmt=)."""
import ast
import fcntl
import os
import subprocess
import sys

from sis_util import TINY_RECIPE, make_setup, run_sis

CONFIG = '''
from sisyphus import tk
from steps import Concat, WriteText


def py():
    a = WriteText("a")
    a.set_vis_name("Text a")
    tk.register_output("joined.txt", Concat([a.out_file, WriteText("b").out_file]).out_file)
'''

FAIL_ONCE_CONFIG = '''
from sisyphus import tk
from steps import FailOnce


def py():
    tk.register_output("done.txt", FailOnce("flag").out_file)
'''

SMALLER_CONFIG = '''
from sisyphus import tk
from steps import WriteText


def py():
    tk.register_output("a.txt", WriteText("a").out_file)
'''


def test_console_runs_code_with_the_graph_and_helpers(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    code = "print(len(graph.jobs()), sorted(graph.outputs)); print([j.get_vis_name() for j in find_job('WriteText')])"
    result = run_sis(setup, "--config", "config/run.py", "console", "-c", code)
    assert result.returncode == 0, result.output
    assert "3 ['joined.txt']" in result.stdout and "'Text a'" in result.stdout


def test_interactive_console_reads_stdin(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    result = run_sis(setup, "--config", "config/run.py", "console", input="print('jobs:', len(jobs()))\n")
    assert result.returncode == 0, result.output
    assert "jobs: 3" in result.output and "Sisyphus console: 3 jobs, 1 outputs loaded" in result.output


def test_interactive_manager_asks_before_each_submission(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    declined = run_sis(setup, "--config", "config/run.py", "m", "-r", "-i", input="n\nn\n")
    assert declined.returncode == 1 and declined.output.count("Submit Job<work/steps/WriteText.") == 2
    assert not (tmp_path / "steps.log").exists()
    accepted = run_sis(setup, "--config", "config/run.py", "m", "-r", "-i", input="y\ny\ny\n")
    assert accepted.returncode == 0, accepted.output
    assert (tmp_path / "output" / "joined.txt").read_text() == "a b"


def test_ui_redraws_a_terminal_view(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    result = run_sis(setup, "--config", "config/run.py", "m", "-r", "--ui")
    assert result.returncode == 0, result.output
    screens = result.stdout.split("\x1b[H\x1b[2J")[1:]
    assert len(screens) >= 2 and "submit" not in result.stderr and "submit" in result.stdout  # log in the view
    assert screens[0].startswith("Sisyphus manager: waiting(1) runnable(2)")
    assert "runnable  steps/WriteText." in screens[0] and "(Text a)" in screens[0]
    assert screens[-1].startswith("Sisyphus manager: finished(3)") and "Log:" in screens[-1]


def test_log_level_number_hides_info_lines(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    quiet = run_sis(setup, "--log_level", "30", "--config", "config/run.py", "m", "-r")
    assert quiet.returncode == 0, quiet.output
    assert "INFO" not in quiet.output
    verbose = run_sis(setup, "--log_level", "20", "--config", "config/run.py", "m", "-r")
    assert "INFO: All 1 outputs finished" in verbose.output


def test_worker_force_resume_reruns_a_failed_task(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": FAIL_ONCE_CONFIG})
    first = run_sis(setup, "--config", "config/run.py", "m", "-r")
    assert first.returncode == 1
    (job_dir,) = (tmp_path / "work" / "steps").glob("FailOnce.*")
    assert (job_dir / "error.run.1").exists()
    relative = os.path.relpath(job_dir, tmp_path)
    refused = run_sis(setup, "worker", relative, "run", "1")
    assert refused.returncode == 1 and "--force_resume" in refused.output
    forced = run_sis(setup, "worker", relative, "run", "1", "--force_resume")
    assert forced.returncode == 0, forced.output
    assert (job_dir / "finished.run.1").exists() and not (job_dir / "error.run.1").exists()
    assert run_sis(setup, "--config", "config/run.py", "m", "-r").returncode == 0


def test_cleaner_removes_unused_folders_after_a_yes_but_never_a_running_one(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG, "small": SMALLER_CONFIG})
    assert run_sis(setup, "--config", "config/run.py", "m", "-r").returncode == 0
    steps = tmp_path / "work" / "steps"
    (concat,) = steps.glob("Concat.*")
    (write_b,) = [p for p in steps.glob("WriteText.*") if (p / "output" / "text.txt").read_text() == "b"]
    (write_a,) = [p for p in steps.glob("WriteText.*") if p != write_b]

    # A worker of write_b's task holds its lock: the folder counts as running.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(write_b / "lock.run.1")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        clean = "tk.cleaner(clean_work_dir=True, mode='remove')"
        declined = run_sis(setup, "--config", "config/small.py", "console", "-c", clean, input="n\n")
        assert declined.returncode == 0, declined.output
        assert "steps/Concat." in declined.stdout and "Nothing changed." in declined.stdout
        assert concat.is_dir() and write_b.is_dir()
        accepted = run_sis(setup, "--config", "config/small.py", "console", "-c", clean, input="y\n")
        assert accepted.returncode == 0, accepted.output
        assert not concat.exists() and write_b.is_dir() and write_a.is_dir()
    finally:
        holder.kill()
        holder.wait()
    with open(write_b / "lock.run.1", "a") as f:  # released: nothing else holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cleaner_packs_finished_job_folders(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    assert run_sis(setup, "--config", "config/run.py", "m", "-r").returncode == 0
    code = "tk.cleaner(clean_job_dir=True, mode='remove'); print(load_job(jobs()[0]._sis_path(abspath=True)).job_id())"
    result = run_sis(setup, "--config", "config/run.py", "console", "-c", code)
    assert result.returncode == 0, result.output
    for folder in (tmp_path / "work" / "steps").iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["finished.tar.gz", "info", "output"]
    assert "steps/Concat." in result.stdout
    rerun = run_sis(setup, "--config", "config/run.py", "m", "-r")
    assert rerun.returncode == 0 and "submit" not in rerun.output


REPORT_CONFIG = """
import os

from sisyphus import tk
from steps import Concat, WriteText


def record(name):
    with open(os.path.join(os.environ["SIS_TEST_SETUP"], "callback.txt"), "a") as f:
        f.write(name + "\\n")


def py():
    joined = Concat([WriteText("x").out_file, WriteText("yz").out_file])
    tk.register_output("joined.txt", joined.out_file)
    tk.register_report("report.txt", {"length": joined.out_length, "doubled": joined.out_length * 2},
                       template="length={length} doubled={doubled}")
    tk.register_callback(record, "all done")
    if os.environ.get("HOLD_JOB"):
        held = WriteText("never")
        held.hold()
        tk.register_output("held.txt", held.out_file)
"""


def test_reports_callbacks_and_held_jobs(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"report": REPORT_CONFIG})
    result = run_sis(setup, "--config", "config/report.py", "m", "-r", extra_env={"HOLD_JOB": "1"})
    assert result.returncode == 1  # the held job's output is missing
    assert "hold: Job<work/steps/WriteText." in result.output
    assert (tmp_path / "output" / "report.txt").read_text() == "length=4 doubled=8"
    assert (tmp_path / "output" / "joined.txt").read_text() == "x yz"
    assert not (tmp_path / "output" / "held.txt").exists() and not (tmp_path / "callback.txt").exists()
    held = [p for p in (tmp_path / "work" / "steps").glob("WriteText.*")]
    assert len(held) == 2  # the held job's folder was never set up
    again = run_sis(setup, "--config", "config/report.py", "m", "-r")
    assert again.returncode == 0, again.output
    assert (tmp_path / "callback.txt").read_text() == "all done\n"


def test_console_helpers_run_remove_and_import_jobs(tmp_path):
    first = make_setup(tmp_path / "first", recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    code = ("j = find_job('Concat')[0]; run(j.out_file, quiet=True); "
            "print('joined:', open(j.out_file.get_path()).read()); print('exit', run_job(j, 'run', 1))")
    ran = run_sis(first, "--config", "config/run.py", "console", "-c", code)
    assert ran.returncode == 0, ran.output
    assert "joined: a b" in ran.stdout and "exit 0" in ran.stdout  # run_job: already finished, nothing to do
    steps = tmp_path / "first" / "work" / "steps"
    assert len(list(steps.iterdir())) == 3

    second = make_setup(tmp_path / "second", recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG})
    imported = run_sis(second, "--config", "config/run.py", "console", "-c",
                       f"print(sorted(import_work_directory({str(tmp_path / 'first' / 'work')!r}, mode='symlink')))")
    assert imported.returncode == 0, imported.output
    assert sorted(p.name for p in (tmp_path / "second" / "work" / "steps").iterdir()) == \
        sorted(p.name for p in steps.iterdir())
    rerun = run_sis(second, "--config", "config/run.py", "m", "-r")
    assert rerun.returncode == 0 and "submit" not in rerun.output

    (write_a,) = [p for p in steps.glob("WriteText.*") if (p / "output" / "text.txt").read_text() == "a"]
    remove = "remove_job_and_descendants(find_job('WriteText')[0] if find_job('WriteText')[0].text == 'a' " \
             "else find_job('WriteText')[1], mode='remove')"
    removed = run_sis(first, "--config", "config/run.py", "console", "-c", remove, input="y\n")
    assert removed.returncode == 0, removed.output
    assert sorted(p.name.split(".")[0] for p in steps.iterdir()) == ["WriteText"]  # b stays
    assert not write_a.exists()


def test_without_a_config_argument_main_of_the_config_package_runs(tmp_path):
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE})
    (tmp_path / "config" / "__init__.py").write_text(
        "from sisyphus import tk\nfrom steps import WriteText\n\n\ndef main():\n"
        "    tk.register_output('main.txt', WriteText('from main').out_file)\n")
    result = run_sis(setup, "m", "-r")
    assert result.returncode == 0, result.output
    assert (tmp_path / "output" / "main.txt").read_text() == "from main"
    (tmp_path / "config" / "__init__.py").write_text("")
    missing = run_sis(setup, "m", "-r")
    assert missing.returncode == 2 and missing.stderr.startswith("sis: error: no config given")


INTERRUPT_RECIPE = '''
import os

from sisyphus import Job, Task


def more_memory(rqmt, last_usage):
    """Task(update_rqmt=...): one GB more after each interruption (last_usage is the worker's usage file)."""
    assert "requested_resources" in last_usage
    return dict(rqmt, mem=rqmt["mem"] + 1)


class Interrupted(Job):
    """Its first run ends without finishing (the process exits); the resumed run finishes."""

    def __init__(self, name):
        self.name = name
        self.out = self.output_path("out.txt")

    def tasks(self):
        yield Task("run", resume="run", rqmt={"mem": 1, "cpu": 1}, update_rqmt=more_memory)

    def run(self):
        flag = os.path.join(os.environ["SIS_TEST_SETUP"], "interrupted.flag")
        if not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(3)
        with open(self.out.get_path(), "w") as f:
            f.write("resumed")
'''

INTERRUPT_CONFIG = '''
from sisyphus import tk
from interrupt import Interrupted


def py():
    tk.register_output("out.txt", Interrupted("x").out)
'''


def test_update_rqmt_sets_the_requirements_of_a_resumed_task(tmp_path):
    setup = make_setup(tmp_path, recipes={"interrupt": INTERRUPT_RECIPE}, configs={"run": INTERRUPT_CONFIG})
    result = run_sis(setup, "--config", "config/run.py", "m", "-r")
    assert result.returncode == 0, result.output
    assert (tmp_path / "output" / "out.txt").read_text() == "resumed"
    (job_dir,) = (tmp_path / "work" / "interrupt").glob("Interrupted.*")
    entries = [ast.literal_eval(line) for line in (job_dir / "submit_log.run").read_text().splitlines() if line.strip()]
    assert [entry["rqmt"]["mem"] for entry in entries] == [1.0, 2.0]
