"""Write the program configs of the offline experiment (config/example.py's graph, from the same preset)
into OUT/configs/, for scripts/run_offline_experiment.sh, which runs them without Sisyphus.

    python3 scripts/offline_configs.py OUT

Also writes OUT/configs/tasks.txt (the merged tasks, one per line) and OUT/configs/sizes.txt (c_0, then
c_t comma-separated: the data sizes gradient matching weighs the Fishers with).
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "recipe")]
from model_merging import presets  # noqa: E402


def write(path, config):
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main(out):
    preset = presets.select(os.environ.get("MERGE_PRESET", "offline"))
    configs = os.path.join(out, "configs")
    os.makedirs(configs, exist_ok=True)
    models, fishers = os.path.join(out, "models"), os.path.join(out, "fishers")
    data_dir = preset["data_dir"] and str(preset["data_dir"])
    pre = preset["pretraining"]
    tasks = list(preset["tasks"])
    train = {**preset["training"], "data_dir": data_dir, "num_train_epochs": preset["num_epochs"]}

    write(os.path.join(configs, "train_pretrained.json"), {
        **train, "model_name_or_path": str(preset["model"]), "dataset_name": pre["task"], "train_split": pre["train_split"],
        "validation_split": pre["validation_split"], "learning_rate": pre["learning_rate"],
        "output_dir": os.path.join(models, "pretrained")})
    pretrained = os.path.join(models, "pretrained", "best")
    fisher = {"method": "sequence_classification_squared_gradients", "data_dir": data_dir, **preset["fisher"]}
    write(os.path.join(configs, "fisher_pretrained.json"), {
        **fisher, "model_name_or_path": pretrained, "dataset_name": pre["task"], "split": pre["fisher_split"],
        "output_dir": os.path.join(fishers, "pretrained")})

    finetune = {**train, "model_name_or_path": pretrained, "learning_rate": preset["finetuning_learning_rate"]}
    for task, spec in preset["tasks"].items():
        write(os.path.join(configs, f"train_{task}.json"), {
            **finetune, "dataset_name": task, "train_split": spec["train_split"],
            "validation_split": preset["validation_splits"][task], "output_dir": os.path.join(models, task)})
        write(os.path.join(configs, f"fisher_{task}.json"), {
            **fisher, "model_name_or_path": os.path.join(models, task, "best"), "dataset_name": task,
            "split": spec["fisher_split"], "output_dir": os.path.join(fishers, task)})
    write(os.path.join(configs, "train_multitask.json"), {
        **finetune, "dataset_name": ";".join(tasks), "train_split": ";".join(preset["tasks"][t]["train_split"] for t in tasks),
        "validation_split": ";".join(preset["validation_splits"][t] for t in tasks),
        "output_dir": os.path.join(models, "multitask")})

    evaluation = {"method": "sequence_classification", "data_dir": data_dir, **preset["evaluation"]}
    for task in [pre["task"]] + tasks:
        write(os.path.join(configs, f"evaluate_{task}.json"), {
            **evaluation, "dataset_name": task, "split": preset["test_splits"][task],
            "model_name_or_path": "MODEL", "output_dir": "OUTPUT"})

    with open(os.path.join(configs, "tasks.txt"), "w") as f:
        f.write("\n".join(tasks) + "\n")
    with open(os.path.join(configs, "sizes.txt"), "w") as f:
        f.write(f"{pre['dataset_size']}\n{','.join(str(preset['tasks'][t]['dataset_size']) for t in tasks)}\n")
    with open(os.path.join(configs, "pretraining_task.txt"), "w") as f:
        f.write(pre["task"] + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
