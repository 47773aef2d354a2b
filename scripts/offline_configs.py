"""Write every step of a config's graph as files a shell can run without Sisyphus, from the Jobs themselves:
each job's folder `OUT/work/<job id>/` with the config or command it writes for its program (`output/*.json`,
`work/run.sh`, exactly what `sis` would write), `OUT/steps.txt` (the job folders, each after the jobs it
reads from), `OUT/outputs.txt` (registered output name, path) and links `OUT/alias/<alias>`.

    python3 scripts/offline_configs.py OUT [CONFIG.py]        (default config: config/example.py)

The settings (preset, data folder) are those of settings.py, as for `sis`; the job ids are the ones `sis`
gives, so a folder made here and one made by `sis` are interchangeable. scripts/run_offline_experiment.sh
runs the steps.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import sisyphus.global_settings as gs  # noqa: E402
import sisyphus.toolkit as tk  # noqa: E402
from sisyphus.job import Job  # noqa: E402
from sisyphus.loader import ConfigLoader  # noqa: E402


def load_graph(config):
    """The config's registered outputs and its jobs, each after the jobs it reads from."""
    gs.load_settings(REPO)
    loader = ConfigLoader()
    try:
        loader.load(config)
        if loader.waiting():
            sys.exit(f"offline_configs: {config} waits for results (async); only configs that build their "
                     "whole graph at once can be written as steps")
    finally:
        loader.close()
    ordered, seen = [], set()

    def visit(job):
        if job.job_id() in seen:
            return
        seen.add(job.job_id())
        for path in sorted(job._sis_inputs):
            if isinstance(path.creator, Job):
                visit(path.creator)
        ordered.append(job)

    for job in tk.sis_graph.jobs():
        visit(job)
    return dict(tk.sis_graph.outputs), ordered


def write_job(job):
    """The job's folder with what its tasks would write before running (`create_files`)."""
    folder = job._sis_path(abspath=True)
    for name in (gs.JOB_OUTPUT, gs.JOB_WORK_DIR, *(os.path.join(gs.JOB_OUTPUT, d) for d in job._sis_output_dirs)):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    cwd = os.getcwd()
    os.chdir(os.path.join(folder, gs.JOB_WORK_DIR))
    try:
        job.create_files()
    finally:
        os.chdir(cwd)
    return folder


def link(target, name):
    os.makedirs(os.path.dirname(name), exist_ok=True)
    if os.path.lexists(name):
        os.unlink(name)
    os.symlink(target, name)


def main(out, config="config/example.py"):
    outputs, jobs = load_graph(config)
    gs.BASE_DIR = os.path.abspath(out)  # job folders under OUT/work/ instead of the repository's
    folders = [write_job(job) for job in jobs]
    for job in jobs:
        for alias in job.get_aliases():
            link(job._sis_path(abspath=True), os.path.join(gs.BASE_DIR, gs.ALIAS_DIR, alias))
    with open(os.path.join(out, "steps.txt"), "w") as f:
        f.write("".join(folder + "\n" for folder in folders))
    with open(os.path.join(out, "outputs.txt"), "w") as f:
        f.write("".join(f"{name}\t{path.get_path()}\n" for name, path in sorted(outputs.items())))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
