"""Merging (`code/merge.py`, the modulated merges of `code/modulated_merge.py`, and the paper's own
`code/task_arithmetic.py` and `code/uncertainty_based_gradient_matching.py` command lines)."""
from sisyphus import Task, tk

from model_merging.catalogue import default
from model_merging.program_job import CommandJob
from model_merging.util import instantiate, rqmt, run_command, write_json, write_run_script


def _path(p):
    return tk.uncached_path(p)


class MergeJob(CommandJob):
    """Any method of the merge library (`docs/merging.md`): `python code/merge.py --options merge.json`,
    the merge's typed options written as JSON (`options()`: the fields of modelmerge.merging.MergeOptions).

    models: the fine-tuned models θ_t; ancestor: θ_0; aux_data: one statistics folder per model (Fisher,
    Gram, trimmed task vector); ancestor_aux_data: statistics of θ_0 (gradient matching's H_0);
    initial: a model to start from (MaTS); parameters: the method's parameters (the options' `params`);
    allow_statistics_mismatch: merge statistics that record another model than theirs (e.g. one Fisher for all);
    shards: N > 1 merges the tensors in N parts, the N parallel task ids of task `run_part` (one SLURM array),
    each with the job's resources, into `work/part-I-of-N.safetensors`, then task `join` writes the same
    `out_model` as one process would (`code/merge.py --shard`, `--join`); a merge whose tensors depend on each
    other runs whole in part 1 (its log says so). A killed part reruns alone.
    Output: `out_model`, a model folder; `out_options`, the options the merge ran with.
    """

    # added later: at their defaults they leave the job ids as they were
    __sis_hash_exclude__ = {"allow_statistics_mismatch": False, "shards": 1}

    def __init__(self, method, models, *, ancestor=None, aux_data=None, ancestor_aux_data=None, initial=None,
                 parameters=None, dtype=None, include=None, exclude=None, allow_statistics_mismatch=False,
                 shards=1, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.method = method
        self.models = list(models)
        self.ancestor = ancestor
        self.aux_data = list(aux_data) if aux_data is not None else None
        self.ancestor_aux_data = ancestor_aux_data
        self.initial = initial
        self.parameters = dict(parameters or {})
        self.dtype = dtype
        self.include = include
        self.exclude = exclude
        self.allow_statistics_mismatch = allow_statistics_mismatch
        if not isinstance(shards, int) or shards < 1:
            raise ValueError(f"MergeJob: shards must be a positive int, got {shards!r}")
        self.shards = shards
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_model = self.output_path("model")
        self.out_options = self.output_path("merge.json")

    def tasks(self):
        if self.shards == 1:
            yield from super().tasks()
            return
        yield Task("create_files", mini_task=True)
        yield Task("run_part", resume="run_part", rqmt=self.rqmt, args=range(1, self.shards + 1))
        yield Task("join", resume="join", rqmt={**self.rqmt, "cpu": 1, "gpu": 0})

    def create_files(self):
        write_json(self.out_options, self.options())
        if self.shards == 1:
            return super().create_files()
        write_run_script(*(self.part_command(index) for index in range(1, self.shards + 1)), self.join_command())

    def run_part(self, index):
        run_command(self.part_command(index), cpu=self.rqmt["cpu"])

    def join(self):
        run_command(self.join_command())

    def part_file(self, index):
        """Part `index` of a sharded merge, in the job's work/ folder (where its tasks run)."""
        return f"part-{index}-of-{self.shards}.safetensors"

    def part_command(self, index):
        return self.command() + ["--output", self.part_file(index), "--shard", f"{index}/{self.shards}", "--no_progress"]

    def join_command(self):
        return [*self.program_command("merge.py"), "--join", *map(self.part_file, range(1, self.shards + 1)),
                "--output", self.out_model.get_path()]

    def command(self):
        return [*self.program_command("merge.py"), "--options", self.out_options.get_path()]

    def options(self):
        """The merge's options (MergeOptions.to_json's keys: `aux_data` is `statistics`), paths resolved; on the
        GPU when the job asks for one."""
        options = {"method": self.method, "models": [_path(model) for model in self.models],
                   "output": self.out_model.get_path()}
        for key, value in (("statistics", self.aux_data and [_path(path) for path in self.aux_data]),
                           ("ancestor", self.ancestor and _path(self.ancestor)),
                           ("ancestor_statistics", self.ancestor_aux_data and _path(self.ancestor_aux_data)),
                           ("initial", self.initial and _path(self.initial)), ("dtype", self.dtype),
                           ("include", self.include), ("exclude", self.exclude)):
            if value is not None:
                options[key] = value
        if self.parameters:
            options["params"] = instantiate(self.parameters)
        if self.allow_statistics_mismatch:
            options["allow_statistics_mismatch"] = True
        if self.rqmt["gpu"] > 0:
            options["device"] = "cuda"
        return options


def _parameter_arguments(parameters):
    arguments = []
    for name, value in sorted(parameters.items()):
        value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        arguments += [f"--x:{name}", value]
    return arguments


class ModulatedMergeJob(CommandJob):
    """EMR-Merging or TALL masks (`code/modulated_merge.py --merge`): a unified model plus each task's mask and
    rescaler, from which MaterialiseTaskJob takes task t's own model.

    method: "emr" or "tall_masks"; models: θ_t (task t is the t-th, from 1); ancestor: θ_0; parameters: the
    method's parameters (`--x:NAME VALUE`). Outputs: `out_dir` (the modulated merge folder) and `out_unified`
    (its unified model folder).
    """

    def __init__(self, method, models, ancestor, *, parameters=None, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.method = method
        self.models = list(models)
        self.ancestor = ancestor
        self.parameters = dict(parameters or {})
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_dir = self.output_path("modulated")
        self.out_unified = self.output_path("modulated/unified")

    def command(self):
        return [*self.program_command("modulated_merge.py"), "--merge", self.method, "--models", *map(_path, self.models),
                "--ancestor", _path(self.ancestor), *_parameter_arguments(self.parameters),
                *_device_and_output(self, self.out_dir)]


class MaterialiseTaskJob(CommandJob):
    """Task `task`'s own model (1-based, in the order of the merged models) from a modulated merge folder
    (ModulatedMergeJob.out_dir) and θ_0: `code/modulated_merge.py --materialise`. Output: `out_model`."""

    def __init__(self, modulated, ancestor, task, *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.modulated = modulated
        self.ancestor = ancestor
        self.task = task
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_model = self.output_path("model")

    def command(self):
        return [*self.program_command("modulated_merge.py"), "--materialise", _path(self.modulated),
                "--task", str(self.task), "--ancestor", _path(self.ancestor), *_device_and_output(self)]


def per_task_models(method, models, ancestor, parameters=None, **rqmt_args):
    """(unified model, [task t's own model for each of `models`]) of a modulated merge."""
    merged = ModulatedMergeJob(method, models, ancestor, parameters=parameters, **rqmt_args)
    return merged.out_unified, [MaterialiseTaskJob(merged.out_dir, ancestor, t, **rqmt_args).out_model
                                for t in range(1, len(models) + 1)]


class TaskArithmeticJob(CommandJob):
    """θ_0 + λ Σ_t (θ_t − θ_0) (Ilharco et al., 2023) with the paper's command line."""

    def __init__(self, pretrained_model, finetuned_models, scaling_factor=1.0, task_type="SEQ_CLS", *,
                 time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.pretrained_model = pretrained_model
        self.finetuned_models = list(finetuned_models)
        self.scaling_factor = scaling_factor
        self.task_type = task_type
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_model_path = self.output_path("model")

    def command(self):
        return [*self.program_command("task_arithmetic.py"),
                "--pretrained_model_name_or_path", _path(self.pretrained_model),
                "--ft_model_name_or_paths", ",".join(map(_path, self.finetuned_models)),
                "--scaling_factor", str(self.scaling_factor),
                "--task_type", self.task_type,
                "--out_model_path", self.out_model_path.get_path()]


class UncertaintyBasedGradientMatchingJob(CommandJob):
    """Uncertainty-based gradient matching (Daheim et al., ICLR 2024) with the paper's command line and
    argument order: Hessians are Fisher statistics folders (or their `hessian/` subfolders)."""

    def __init__(self, pretrained_model, finetuned_models, pretrained_hessian, finetuned_hessians, delta_0,
                 task_type="SEQ_CLS", scaling_factor=1.0, scaling_factor_pretrained=1.0, scaling_factors_finetuned=(),
                 *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.pretrained_model = pretrained_model
        self.finetuned_models = list(finetuned_models)
        self.pretrained_hessian = pretrained_hessian
        self.finetuned_hessians = list(finetuned_hessians)
        self.delta_0 = delta_0
        self.task_type = task_type
        self.scaling_factor = scaling_factor
        self.scaling_factor_pretrained = scaling_factor_pretrained
        self.scaling_factors_finetuned = list(scaling_factors_finetuned)
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_model_path = self.output_path("model")

    def command(self):
        return [*self.program_command("uncertainty_based_gradient_matching.py"),
                "--pretrained_model_name_or_path", _path(self.pretrained_model),
                "--pretrained_hessian_path", _path(self.pretrained_hessian),
                "--ft_model_name_or_paths", ",".join(map(_path, self.finetuned_models)),
                "--ft_hessian_paths", ",".join(map(_path, self.finetuned_hessians)),
                "--delta_0", str(self.delta_0),
                "--scaling_factor", str(self.scaling_factor),
                "--scaling_factor_pt", str(self.scaling_factor_pretrained),
                "--scaling_factors_ft", ",".join(map(str, self.scaling_factors_finetuned)),
                "--task_type", self.task_type,
                "--out_model_path", self.out_model_path.get_path()]


def _device_and_output(job, output=None):
    """The end of a merge command: `--device cuda` when the job asks for a GPU, then the output folder
    (`output`, default the job's `out_model`)."""
    output = job.out_model if output is None else output
    return [*(["--device", "cuda"] if job.rqmt["gpu"] > 0 else []), "--output", output.get_path()]


class TaskDataMergeJob(CommandJob):
    """Base of the merges that run each task model θ_t on its own data set (RegMean++, AdaMerging).

    models: θ_t; datasets: each task's data set (folder or name), same order; split: the split used (one for
    all, or a list, one per data set); num_examples, batch_size, max_length: how much of it, and how batched.
    Output: `out_model`, a model folder. Subclasses keep their own `__init__` (its arguments are the job id) and
    name the catalogue's method they run (`method`), by which model_merging.pipeline.merge_method finds them, and
    take the method's parameter defaults from the catalogue (`default(method, ...)`, evaluated in the class body).
    """

    def __init__(self, models, datasets, split, num_examples, batch_size, max_length, rqmt):
        self.models = list(models)
        self.datasets = list(datasets)
        self.split = split
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.max_length = max_length
        self.rqmt = rqmt
        self.out_model = self.output_path("model")

    def task_data_arguments(self):
        splits = [self.split] if isinstance(self.split, str) else list(self.split)
        return ["--models", *map(_path, self.models), "--datasets", *map(_path, self.datasets), "--split", *splits,
                "--num_examples", str(self.num_examples), "--batch_size", str(self.batch_size),
                "--max_length", str(self.max_length)]


class RegMeanPlusPlusJob(TaskDataMergeJob):
    """RegMean++ (Nguyen et al., 2025): merge layer by layer with Gram matrices taken from the partly merged
    model on each task's data (`code/regmean_plusplus.py`). The Grams are taken on `split` (default train).
    """

    method = "regmean_plusplus"  # the catalogue's name of the method it runs

    def __init__(self, models, datasets, split="train", *, alpha=default(method, "alpha"), num_examples=256,
                 batch_size=16, max_length=128, time_rqmt=1, mem_rqmt=8, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(models, datasets, split, num_examples, batch_size, max_length,
                         rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt))
        self.alpha = alpha

    def command(self):
        return [*self.program_command("regmean_plusplus.py"), *self.task_data_arguments(), "--alpha", str(self.alpha),
                *_device_and_output(self)]


class AdaMergingJob(TaskDataMergeJob):
    """AdaMerging (Yang et al., ICLR 2024): learn layer-wise merge coefficients by entropy minimisation on
    unlabelled inputs of each task, then merge with them (`code/adamerging.py`).

    ancestor: θ_0; the inputs of `split` (default validation) are used, never its labels.
    Output: `out_model`, a model folder with adamerging.json (the learned coefficients, entropy per step).
    """

    method = "adamerging"  # the catalogue's name of the method it runs

    def __init__(self, ancestor, models, datasets, split="validation", *, iterations=default(method, "iterations"),
                 learning_rate=default(method, "learning_rate"), prior=default(method, "prior"), num_examples=64,
                 batch_size=16, max_length=128, time_rqmt=1, mem_rqmt=8, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(models, datasets, split, num_examples, batch_size, max_length,
                         rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt))
        self.ancestor = ancestor
        self.iterations = iterations
        self.learning_rate = learning_rate
        self.prior = prior

    def command(self):
        return [*self.program_command("adamerging.py"), "--ancestor", _path(self.ancestor), *self.task_data_arguments(),
                "--iterations", str(self.iterations), "--learning_rate", str(self.learning_rate), "--prior", str(self.prior),
                *_device_and_output(self)]
