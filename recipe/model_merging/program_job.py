"""Base classes of the jobs that run one program of code/: the command (and config) is written into
the job folder first (`create_files`, a mini task), so anyone can rerun the step by hand.

The one place where a job's `cpu_rqmt` becomes its program's torch threads: `--threads N` on a command
line (`program_command`), `num_threads` in a JSON config (`program_config`). Neither enters the job id,
which hashes the job's arguments without the resources."""
from sisyphus import Job, Task

from model_merging.util import python_exe, program, rqmt, run_command, without_rqmt, write_json, write_run_script


class CommandJob(Job):
    """Runs `command()` (written to `run.sh` in the job's work folder). Subclasses set `self.rqmt`."""

    def command(self):
        raise NotImplementedError

    def program_path(self, name):
        """The program `name` of code/ (`gs.CODE_ROOT`)."""
        return program(name)

    def program_command(self, name):
        """The start of a command line: the interpreter, the program `name` and `--threads` with the job's CPUs."""
        return [python_exe(), self.program_path(name), "--threads", str(self.rqmt["cpu"])]

    def create_files(self):
        write_run_script(self.command())

    def run(self):
        run_command(self.command(), cpu=self.rqmt["cpu"])

    def tasks(self):
        yield Task("create_files", mini_task=True)
        yield Task("run", resume="run", rqmt=self.rqmt)

    @classmethod
    def hash(cls, parsed_args):
        return super().hash(without_rqmt(parsed_args))


class ProgramJob(CommandJob):
    """Runs `code/<program_name> <job>/output/<config_name>`.

    Subclasses set `program_name` and `config_name`, call `super().__init__(...)` with their resources,
    declare their outputs, and return the program's config from `config()` (values may be tk.Paths and
    tk.Variables; they are resolved when the config is written, once the inputs are computed). The config
    written is `program_config()`: with the job's CPUs as the program's `threads_key`, unless config() sets it.
    """

    program_name = None
    config_name = "config.json"
    threads_key = "num_threads"  # the program's key for its torch threads; None: a program without one

    def __init__(self, *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_config_file = self.output_path(self.config_name)

    def config(self):
        raise NotImplementedError

    def program_command(self, name):
        """The interpreter and the program `name`: its threads come in the config (`program_config`)."""
        return [python_exe(), self.program_path(name)]

    def program_config(self):
        threads = {self.threads_key: self.rqmt["cpu"]} if self.threads_key else {}
        return {**threads, **self.config()}

    def command(self):
        return [*self.program_command(self.program_name), self.out_config_file.get_path()]

    def create_files(self):
        write_json(self.out_config_file, self.program_config())
        super().create_files()
