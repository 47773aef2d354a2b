"""The authors' Job signatures (Daheim et al., "Model Merging by Uncertainty-Based Gradient Matching",
ICLR 2024) over this project's Jobs (`model_merging`).

Every Job takes `code_root` first, the folder of the programs (`train.py`, `predict.py`, ...); it does not
enter the job id, since where the code lies changes no result. `gpumem` (GB of GPU memory) asks for a GPU;
like every resource it stays out of the id. `dummy`, the authors' way to force a new job, is hashed when
given.
"""
from model_merging.util import program

NOT_HASHED = ("code_root", "gpumem")


class AuthorsSignature:
    """Mixed in before a project Job: programs from `self.code_root`, `code_root`/`gpumem` out of the hash."""

    @classmethod
    def hash(cls, parsed_args):
        args = {key: value for key, value in parsed_args.items()
                if key not in NOT_HASHED and not (key == "dummy" and value is None)}
        return super().hash(args)

    def program_path(self, name):
        return program(name, self.code_root)


def gpus(gpu_rqmt, gpumem):
    """GPUs a job asks for: `gpu_rqmt` if given, else one when GPU memory is asked for."""
    if gpu_rqmt is not None:
        return gpu_rqmt
    return 1 if gpumem else 0
