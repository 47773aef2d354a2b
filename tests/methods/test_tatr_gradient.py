"""TATR's gradient form (`tatr_gradient`, methods/trust_region.py) against FusionBench 0.2.33's own
TaskArithmeticWithTrustRegionForCLIP (`zero_shot: false`), end to end: its per-example gradient loop at θ_0 and its
merge, against our statistic (predict's mode `gradient_magnitude`) and our merge, on a tiny BERT classifier; then
through code/merge.py, and the inputs it refuses."""
import os
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.methods import TensorGroup
from modelmerge.statistics import compute_gradient_magnitude, save_gradient_magnitude
from test_methods import run_method
from test_methods_data_free import merged_tensors
from tiny import make_tiny_bert, perturbed_copy

FUSION_BENCH = os.environ.get("FUSION_BENCH_DIR", os.path.expanduser("~/.cache/modelmerge/fusion_bench-0.2.33"))
TASKS = ("alpha", "beta", "gamma")
# one tensor of each kind of layer; FusionBench's quantile runs over the flattened model, ours per tensor, so each
# FusionBench run has one trainable tensor (its gradients do not depend on which others are trainable)
KEYS = ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.LayerNorm.weight", "bert.embeddings.word_embeddings.weight")
WORDS = "good bad fine awful great poor nice dull fun sad happy boring".split()

# FusionBench's algorithm with what a CLIP model pool and Lightning Fabric give it written out for a text
# classifier: logits from the model's own head, backward on the loss. `patched`: compute_avg_abs_grads keyed by
# the task (its line `all_avg_abs_grads[name] = grad` keys every task's gradients by the last parameter's name,
# so one entry remains, Ω ≡ 0, and the merge is θ_0; see methods/trust_region.py).
REFERENCE = r"""
import inspect, sys, textwrap, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
import fusion_bench.method.trust_region.clip_task_arithmetic as tatr

base_path, out, keys, patched = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4] == "patched"
tasks = {name: (path, data) for name, path, data in (entry.split("=", 2) for entry in sys.argv[5:])}
tokenizer = AutoTokenizer.from_pretrained(base_path)
tatr.CLIPDataset = lambda dataset, processor: dataset
if patched:
    source = textwrap.dedent(inspect.getsource(tatr.TaskArithmeticWithTrustRegionForCLIP.compute_avg_abs_grads))
    assert source.count("all_avg_abs_grads[name] = grad") == 1
    namespace = dict(vars(tatr))
    exec(source.replace("all_avg_abs_grads[name] = grad", "all_avg_abs_grads[train_dataset_name] = grad"), namespace)
    tatr.TaskArithmeticWithTrustRegionForCLIP.compute_avg_abs_grads = namespace["compute_avg_abs_grads"]


def load(path, key):
    # only `key` trainable, and listed as the only parameter: the algorithm adds its masked task vector sum to every
    # listed parameter (FusionBench's CLIP vision models train all of theirs)
    model = AutoModelForSequenceClassification.from_pretrained(path).double()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name == key)

    class OneTensor(type(model)):
        def named_parameters(self, *args, **kwargs):
            return ((n, p) for n, p in super().named_parameters(*args, **kwargs) if p.requires_grad)

    model.__class__ = OneTensor
    return model


class Wrapped(torch.nn.Module):  # what Fabric's setup_module returns: the model as `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


class Fabric:
    setup_module = staticmethod(Wrapped)
    setup_dataloaders = staticmethod(lambda loader: loader)
    backward = staticmethod(lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph))


class Pool:
    def __init__(self, key):
        self.key = key
        self.train_dataset_names = list(tasks)

    def load_pretrained_model(self):
        return load(base_path, self.key)

    def named_models(self):
        return [(name, load(path, self.key)) for name, (path, _) in tasks.items()]

    def load_train_dataset(self, name):  # the "images" are positions in the task's texts (a batch is a tensor)
        return [(torch.tensor(i), label) for i, label in enumerate(map(int, tasks[name][1].split("|")[1].split(";")))]


class Algorithm(tatr.TaskArithmeticWithTrustRegionForCLIP):
    fabric = Fabric()
    clip_processor = None

    def setup_zero_shot_classification_head(self):
        pass

    def compute_logits(self, model, positions, task):
        texts = [tasks[task][1].split("|")[0].split(";")[i] for i in positions.tolist()]
        return model.module(**tokenizer(texts, return_tensors="pt", padding=True)).logits


results = {}
for key in keys:
    algorithm = Algorithm(scaling_factor=0.3, threshold_quantile=0.9, max_samples=128, batch_size=5, zero_shot=False)
    results[key] = dict(algorithm.run(Pool(key)).named_parameters())[key].detach().clone()
torch.save(results, out)
"""


def task_rows(task, count=9):
    generator = torch.Generator().manual_seed(TASKS.index(task) + 7)
    rows = []
    for _ in range(count):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(2, 6, (1,))),), generator=generator)]
        rows.append({"text": " ".join(words), "label": int(torch.randint(2, (1,), generator=generator))})
    return rows


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tatr_gradient")
    base = make_tiny_bert(str(root / "base"), seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    models = {task: perturbed_copy(base, str(root / task), seed=i + 1, scale=0.05) for i, task in enumerate(TASKS)}
    data = {task: task_rows(task) for task in TASKS}
    return root, base, models, data


def our_statistics(zoo):
    """Each task's gradient magnitude at θ_0 on its data, as statistics folders (float64, as the reference)."""
    root, base, _, data = zoo
    model = AutoModelForSequenceClassification.from_pretrained(base).double()
    tokenizer = AutoTokenizer.from_pretrained(base)
    folders = {}
    for task in TASKS:
        result = compute_gradient_magnitude(model, tokenizer, datasets.Dataset.from_list(data[task]), batch_size=4)
        folders[task] = str(root / f"stats_{task}")
        save_gradient_magnitude(result, model, folders[task])
    return folders


def tensors(path):
    return merged_tensors(path)


def reference(zoo, tmp_path, patched):
    if not os.path.isdir(os.path.join(FUSION_BENCH, "fusion_bench")):
        pytest.skip(f"FusionBench is not installed in {FUSION_BENCH} (bash .ci/install.sh)")
    _, base, models, data = zoo
    arguments = [f"{task}={models[task]}=" + ";".join(r["text"] for r in data[task]) + "|"
                 + ";".join(str(r["label"]) for r in data[task]) for task in TASKS]
    out = tmp_path / "reference.pt"
    done = subprocess.run([sys.executable, "-c", REFERENCE, base, str(out), ",".join(KEYS),
                           "patched" if patched else "as shipped", *arguments],
                          env=dict(os.environ, PYTHONPATH=FUSION_BENCH), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def ours(zoo, folders, key, **parameters):
    _, base, models, _ = zoo
    ancestor = tensors(base)[key].double()
    stats = [{"gradient_magnitude": tensors(folders[task])[key]} for task in TASKS]
    group = TensorGroup(key, [tensors(models[task])[key].double() for task in TASKS], ancestor=ancestor, statistics=stats)
    return run_method("tatr_gradient", group, **parameters)


@pytest.mark.slow
def test_tatr_gradient_is_fusion_benchs_trust_region_with_its_keying_fixed(zoo, tmp_path):
    expected = reference(zoo, tmp_path, patched=True)
    folders = our_statistics(zoo)
    for key in KEYS:
        merged = ours(zoo, folders, key, threshold_quantile=0.9)
        torch.testing.assert_close(merged, expected[key], rtol=0, atol=1e-12, msg=key)
        kept = int((merged != tensors(zoo[1])[key].double()).sum())
        # the embedding rows of words no exemplar holds have no gradient: Ω = 0 on more than q of the entries, so
        # the threshold is 0 and `Ω < 0` keeps none, in both
        assert kept == 0 if "embeddings" in key else 0 < kept <= int(merged.numel() * 0.9), key


@pytest.mark.slow
def test_fusion_benchs_shipped_gradient_form_returns_theta_0(zoo, tmp_path):
    """The keying bug as shipped: whatever the task vectors, FusionBench's merge is θ_0 (what ours is not)."""
    shipped = reference(zoo, tmp_path, patched=False)
    base = tensors(zoo[1])
    for key in KEYS:
        torch.testing.assert_close(shipped[key], base[key].double(), rtol=0, atol=0)


def test_conflict_weights_each_tasks_gradient_by_the_other_task_vectors():
    """Ω = Σ_i Σ_(j≠i) G_i ⊙ |τ_j|, written out: with only task 0's gradient, at entry 1, Ω = [0, 0.6, 0, 0] and
    q = 0.75 drops entry 1 alone; the data-free form (G_i = |τ_i|) drops entry 0, where the task vectors are large."""
    base = torch.zeros(4)
    taus = [torch.tensor([3.0, 0.1, 0.1, 0.1]), torch.tensor([2.0, 0.5, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.1, 0.1])]
    grads = [torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.zeros(4), torch.zeros(4)]
    group = TensorGroup("w", [base + tau for tau in taus], ancestor=base, statistics=[{"gradient_magnitude": g} for g in grads])
    merged = run_method("tatr_gradient", group, threshold_quantile=0.75, merge_lambda=1.0)
    torch.testing.assert_close(merged, torch.tensor([5.1, 0.0, 0.3, 0.3]))
    data_free = run_method("tatr", TensorGroup("w", group.tensors, ancestor=base), threshold_quantile=0.75, merge_lambda=1.0)
    torch.testing.assert_close(data_free, torch.tensor([0.0, 0.7, 0.3, 0.3]))


# --- through code/merge.py -------------------------------------------------------------------------

def merge_cli(*arguments):
    import merge as merge_program
    from modelmerge.merging.cli import run_cli

    return run_cli(merge_program.main, [*arguments, "--no_progress"])


@pytest.fixture(scope="module")
def statistics(zoo):
    return our_statistics(zoo)


def test_merge_program_reads_the_statistics_folders(zoo, statistics, tmp_path):
    _, base, models, _ = zoo
    merge_cli("--merge", "tatr_gradient", "--models", *models.values(), "--aux_data", *statistics.values(),
              "--ancestor", base, "--x:threshold_quantile", "0.8", "--output", str(tmp_path / "out"))
    out, ancestor = tensors(tmp_path / "out"), tensors(base)
    inputs, stats = [tensors(models[t]) for t in TASKS], [tensors(statistics[t]) for t in TASKS]
    for name in ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        group = TensorGroup(name, [m[name] for m in inputs], ancestor=ancestor[name],
                            statistics=[{"gradient_magnitude": s[name].float()} for s in stats])
        torch.testing.assert_close(out[name], run_method("tatr_gradient", group, threshold_quantile=0.8))


def test_statistics_a_method_does_not_read_are_refused(zoo, statistics, tmp_path, capsys):
    from modelmerge.statistics import compute_fisher, save_fisher

    _, base, models, data = zoo
    model = AutoModelForSequenceClassification.from_pretrained(models["alpha"])
    fisher = tmp_path / "fisher"
    save_fisher(compute_fisher(model, AutoTokenizer.from_pretrained(base),
                               datasets.Dataset.from_list(data["alpha"]), num_examples=2), model, str(fisher))
    cases = [
        (["--merge", "tatr_gradient", "--aux_data", str(fisher), str(fisher), str(fisher)],
         "method tatr_gradient reads statistics gradient_magnitude; " + str(fisher) + " holds fisher"),
        (["--merge", "fisher", "--aux_data", *statistics.values()],
         "method fisher reads statistics fisher; " + statistics["alpha"] + " holds gradient_magnitude"),
        (["--merge", "tatr", "--aux_data", *statistics.values()], "method tatr uses no statistics of the models"),
        (["--merge", "tatr_gradient"], "method tatr_gradient needs statistics (gradient_magnitude) of every model"),
    ]
    capsys.readouterr()  # the Fisher's progress output
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_:
            merge_cli(*arguments, "--models", *models.values(), "--ancestor", base, "--output", str(tmp_path / "no"))
        assert exit_.value.code != 0
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], error
        assert not (tmp_path / "no").exists()


def test_help_lists_the_gradient_form(merge_help):
    assert "\n  tatr_gradient (also trust_region_gradient, tatr_gradients)  needs θ_0, statistic 'gradient_magnitude'" in merge_help
