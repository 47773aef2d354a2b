"""What every Job of this project shares: resource requirements outside the hash, writing the
program's config or command into the job folder, and running the program."""
import json
import os
import shlex
import subprocess

from sisyphus import gs, tk

# Resource arguments every Job takes; none of them changes a result, so none enters the hash.
RQMT_ARGS = ("time_rqmt", "mem_rqmt", "cpu_rqmt", "gpu_rqmt")


def rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt):
    return {"time": time_rqmt, "mem": mem_rqmt, "cpu": cpu_rqmt, "gpu": gpu_rqmt}


def without_rqmt(parsed_args):
    return {k: v for k, v in parsed_args.items() if k not in RQMT_ARGS}


def python_exe():
    return getattr(gs, "PYTHON_EXE", None) or "python3"


def program(name, code_root=None):
    """Absolute path of the program `name` under `code_root` (default: the project's code/ folder, `gs.CODE_ROOT`)."""
    return os.path.join(tk.uncached_path(gs.CODE_ROOT if code_root is None else code_root), name)


def instantiate(obj):
    """`obj` with every tk.Path turned into its path string and every tk.Variable into its value."""
    if isinstance(obj, tk.Variable):
        return obj.get()
    if isinstance(obj, tk.Path):
        return obj.get_path()
    if isinstance(obj, dict):
        return {k: instantiate(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [instantiate(v) for v in obj]
    return obj


def write_json(path, obj):
    path = tk.uncached_path(path)
    with open(path + ".tmp", "w") as f:
        json.dump(instantiate(obj), f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_run_script(*commands, path="run.sh"):
    """Write `commands` (each a list of arguments), one line each, as an executable shell script (in the task's
    cwd, the job's work/ folder), so that anyone can rerun the step by hand."""
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\nset -euo pipefail\n"
                + "".join(" ".join(shlex.quote(c) for c in cmd) + "\n" for cmd in commands))
    os.chmod(path, 0o755)


def run_command(cmd, cpu=1):
    """Run a program with OpenMP's and MKL's thread counts set from the task's CPU requirement, for every library
    it loads (on a busy machine one thread per core asked for is faster than one per core present); its torch
    threads it is also given on its command line or in its config (program_job.py)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cpu), MKL_NUM_THREADS=str(cpu), TOKENIZERS_PARALLELISM="false")
    subprocess.check_call(cmd, env=env)
