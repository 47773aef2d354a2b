"""Overhead of the `sis` manager on a graph of small jobs (default 1,000), run by the local engine.

The graph: one root job fans out to `--chains` chains of equal length; the last job of every chain is a
registered output. Every task writes one small file. Printed:
  1. config load + hashing + graph build, measured in this process;
  2. the first `sis m -r` (runs every task; each task is one Python process);
  3. the no-op rerun `sis m -r` over the finished graph, against the target of 5 s.

    python benchmarks/engine_overhead.py [--jobs 1000] [--chains 37] [--cpu 2] [--keep DIR]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RERUN_TARGET_SECONDS = 5.0

SETTINGS = """
WORK_DIR = "work"
IMPORT_PATHS = ["config", "recipe/"]
WAIT_PERIOD_BETWEEN_CHECKS = 1
CLEANUP_ENVIRONMENT = False  # tasks keep the caller's environment
JOB_AUTO_CLEANUP = False  # job folders stay unpacked for inspection


def engine():
    from sisyphus.localengine import LocalEngine

    return LocalEngine(cpu={cpu}, gpu=0, mem=8)
"""

RECIPE = """
from sisyphus import Job, Task


class Step(Job):
    def __init__(self, name, previous=None):
        self.name = name
        self.previous = previous
        self.out_file = self.output_path("step.txt")

    def tasks(self):
        yield Task("run", rqmt={"cpu": 1, "mem": 0.1})

    def run(self):
        before = open(self.previous.get_path()).read() if self.previous is not None else ""
        with open(self.out_file.get_path(), "w") as f:
            f.write(before[-200:] + self.name + "\\n")
"""

CONFIG = """
from sisyphus import tk
from recipe.bench import Step


def py():
    root = Step("root")
    length = ({jobs} - 1) // {chains}
    for chain in range({chains}):
        previous = root.out_file
        for position in range(length):
            previous = Step(f"{{chain}}.{{position}}", previous).out_file
        tk.register_output(f"chain_{{chain}}.txt", previous)
"""


def write_setup(folder, jobs, chains, cpu):
    files = {"settings.py": SETTINGS.format(cpu=cpu), "recipe/__init__.py": "", "recipe/bench.py": RECIPE,
             "config/__init__.py": "", "config/bench.py": CONFIG.format(jobs=jobs, chains=chains)}
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(textwrap.dedent(text))


def time_graph_build(folder):
    """Seconds for loading settings and the config (which hashes every job) and collecting the graph."""
    sys.path.insert(0, REPO)
    previous = os.getcwd()
    os.chdir(folder)
    try:
        start = time.perf_counter()
        import sisyphus.global_settings as gs
        import sisyphus.toolkit as tk
        from sisyphus.loader import ConfigLoader

        gs.load_settings(folder)
        loader = ConfigLoader()
        loader.load("config/bench.py")
        count = len(tk.sis_graph.jobs())
        seconds = time.perf_counter() - start
        loader.close()
    finally:
        os.chdir(previous)
    return count, seconds


def run_manager(folder, log_name):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(os.path.join(folder, log_name), "w") as log:
        status = subprocess.run([sys.executable, "-m", "sisyphus", "--config", "config/bench.py", "m", "-r"],
                                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"sis m -r failed with status {status}; see {os.path.join(folder, log_name)}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="number of jobs in the graph")
    parser.add_argument("--chains", type=int, default=37, help="number of chains the root fans out to")
    parser.add_argument("--cpu", type=int, default=2, help="cpu limit of the local engine")
    parser.add_argument("--keep", metavar="DIR", help="build the setup in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    if (args.jobs - 1) % args.chains:
        parser.error(f"--jobs minus the root ({args.jobs - 1}) must be a multiple of --chains ({args.chains})")

    folder = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="sis_bench_")
    write_setup(folder, args.jobs, args.chains, args.cpu)
    print(f"setup: {folder}  ({args.jobs} jobs: 1 root -> {args.chains} chains of {(args.jobs - 1) // args.chains}; "
          f"LocalEngine cpu={args.cpu}; {os.cpu_count()} cores here)")

    jobs, build = time_graph_build(folder)
    assert jobs == args.jobs, f"graph has {jobs} jobs, expected {args.jobs}"
    print(f"config load + hashing + graph build: {build:.2f} s for {jobs} jobs ({1000 * build / jobs:.2f} ms/job)")

    first = run_manager(folder, "first_run.log")
    print(f"first run, every task (one Python process each): {first:.1f} s ({first / jobs:.3f} s/job)")

    rerun = run_manager(folder, "rerun.log")
    verdict = "meets" if rerun < RERUN_TARGET_SECONDS else "MISSES"
    print(f"no-op rerun over the finished graph: {rerun:.2f} s  ({verdict} the target of < {RERUN_TARGET_SECONDS:.0f} s)")


if __name__ == "__main__":
    main()
