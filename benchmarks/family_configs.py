"""Run the offline presets of config/vit_tasks.py and config/t5_tasks.py end to end with the local engine
(`sis --config config/X.py m -r` in the repository), and print the wall time and the report table of each.

    python benchmarks/family_configs.py                 # both configs
    python benchmarks/family_configs.py --configs vit_tasks

The offline presets need no network: a job makes a small random model (CLIP / T5) and synthetic tasks (images
whose class is one visual property / GLUE-format sentences whose class is that of a keyword of the task's own
lexicon). Target: each under 30 minutes on 2 CPU cores.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["vit_tasks", "t5_tasks"])
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "VIT_TASKS_PRESET": "offline", "T5_TASKS_PRESET": "offline"}
    for name in args.configs:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "sisyphus", "--config", f"config/{name}.py", "m", "-r"],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        minutes = (time.perf_counter() - start) / 60
        print(f"## {name} (offline preset): {minutes:.1f} min, exit status {result.returncode}, "
              f"load average {os.getloadavg()[0]:.1f}")
        table = os.path.join(ROOT, "output", name, "report", "results.md")
        if result.returncode != 0 or not os.path.isfile(table):
            print(result.stderr[-3000:])
            continue
        with open(table) as f:
            print(f.read())


if __name__ == "__main__":
    main()
