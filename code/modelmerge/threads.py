"""Torch's CPU threads for a program: the JSON-config programs' `num_threads` key, the command-line programs'
`--threads N`; the Jobs of recipe/ pass their `cpu_rqmt` as either (recipe/model_merging/program_job.py).

torch.set_num_threads sets OpenMP's and MKL's thread counts together, so the SVDs and eigendecompositions
(LAPACK, in MKL) of TSV-M, Iso-C/CTS, CART and KnOTS use the threads as the matrix products (WUDI's steps,
the forward and backward passes) do. Inter-op threads are left alone: no program here runs work on torch's inter-op pool
(no TorchScript, no torch.jit.fork; CPU autograd runs on the calling thread), and torch lets a process set
that pool's size only once, before first use.
"""
import contextlib
import os


def default_threads():
    """Torch threads for a job: its CPU allocation ($SLURM_CPUS_PER_TASK, $OMP_NUM_THREADS), else all cores."""
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def check_threads(value, name="threads"):
    """`value` if it is a whole number of at least 1 (not a bool), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def set_torch_threads(count):
    """Run torch with `count` threads on the CPU from now on (None: leave them as they are)."""
    import torch  # here, not above: checking a config (harness.py's) needs no torch

    if count is not None:
        torch.set_num_threads(check_threads(count))


@contextlib.contextmanager
def torch_threads(count):
    """Run the block with `count` torch threads on the CPU (None: as they are), then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    set_torch_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
