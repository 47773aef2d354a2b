"""Statistics of trained models: squared-gradient Fisher, Gram matrices and mean absolute gradients
(`code/predict.py`), and the trimmed task vector of TIES (`code/trim.py`)."""
from sisyphus import tk

from model_merging.program_job import CommandJob
from model_merging.search import PredictJob
from model_merging.util import rqmt


class FisherJob(PredictJob):
    """Diagonal squared-gradient Fisher of `model` on `dataset_name`/`split` (labels sampled from the
    model, or gold labels with `config={'empirical': True}`).

    Outputs: `out_dir` (the statistics folder the merge programs take), `out_hessian` (its model-shaped
    `hessian/` folder), `out_fisher` (fisher.safetensors).
    """

    config_name = "fisher_config.json"
    output_name = "fisher"
    mode = "squared_gradients"

    def declare_outputs(self):
        self.out_hessian = self.output_path("fisher/hessian")
        self.out_fisher = self.output_path("fisher/fisher.safetensors")


class GramJob(PredictJob):
    """Gram matrices of every linear layer's inputs and output gradients (RegMean, MaTS).

    Output: `out_dir`, a statistics folder with gram.safetensors and output_grad_gram.safetensors.
    """

    config_name = "gram_config.json"
    output_name = "gram"
    mode = "gram"


class GradientMagnitudeJob(PredictJob):
    """TATR's statistic (Sun et al., ICLR 2025): the mean absolute per-example gradient 1/N Σ_i |∇ log p(y_i|x_i)|
    of `model` on `dataset_name`/`split`, with the gold labels (sampled ones with `config={'empirical': False}`).
    For `tatr_gradient`, `model` is θ_0 and the data each task's exemplars (FusionBench: 128 per task).

    Output: `out_dir`, a statistics folder with gradient_magnitude.safetensors.
    """

    config_name = "gradient_magnitude_config.json"
    output_name = "gradient_magnitude"
    mode = "gradient_magnitude"


class TrimmedTaskVectorJob(CommandJob):
    """A statistic of TIES-Merging (Yadav et al., 2023): the trimmed task vector, the top `density` fraction
    of θ_t − θ_0 by magnitude (`code/trim.py`). Output: `out_dir`, a statistics folder for `ties`."""

    def __init__(self, model, ancestor, density, *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.model = model
        self.ancestor = ancestor
        self.density = density
        self.rqmt = rqmt(time_rqmt, mem_rqmt, cpu_rqmt, gpu_rqmt)
        self.out_dir = self.output_path("trimmed")

    def command(self):
        return [*self.program_command("trim.py"), "--model", tk.uncached_path(self.model), "--ancestor", tk.uncached_path(self.ancestor),
                "--density", str(self.density), "--output", self.out_dir.get_path()]


# The name before 2026-11: configs written against it keep working (ids: TrimmedTaskVectorJob;
# scripts/migrate_job_ids.py moves old folders).
TrimmedModelJob = TrimmedTaskVectorJob
