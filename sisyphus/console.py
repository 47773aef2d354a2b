"""The namespace of `sis console`: the toolkit's names (as the reference Sisyphus console offers them) plus the
loaded graph.

    graph / tk.sis_graph    the graph of the loaded configs;  jobs(): its jobs
    find_job('Train')       jobs whose id contains the text;  find_path('model')
    setup_job_directory(j), run_job(j, 'run', 1, force_resume=False)
    remove_job_and_descendants(j, mode='dryrun'), cleaner(clean_work_dir=True, mode='dryrun')
    load_job('work/.../Job.hash'), import_work_directory(['../other/work'], mode='dryrun'), run(path)
"""
import sisyphus.global_settings as gs
import sisyphus.toolkit as tk
from sisyphus.job import Job
from sisyphus.job_path import Path, Variable
from sisyphus.task import Task


def console_namespace():
    namespace = {name: getattr(tk, name) for name in tk.__all__}
    namespace.update({"tk": tk, "gs": gs, "Job": Job, "Task": Task, "Path": Path, "Variable": Variable,
                      "graph": tk.sis_graph, "jobs": tk.sis_graph.jobs, "help_sis": lambda: print(__doc__)})
    return namespace
