"""config/vit_tasks.py and config/t5_tasks.py build their graphs (both presets): every task model with its
statistics, every merge method of the library, every model evaluated on every task. (The offline presets run
end to end with `python benchmarks/family_configs.py`.)"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "recipe")]


@pytest.mark.parametrize("config, preset", [("vit_tasks", "offline"), ("vit_tasks", "full"), ("t5_tasks", "offline"),
                                            ("t5_tasks", "full")])
def test_graph_of_every_preset(config, preset, monkeypatch):
    import importlib

    from config.merging_methods import DATA_AWARE, MERGE_GRIDS, PER_TASK
    from model_merging.families import build_suite

    module = importlib.import_module(f"config.{config}")
    chosen = getattr(module, f"{preset}_preset")()
    results, report = build_suite(chosen)
    tasks = list(chosen["tasks"])
    methods = [label for label, spec in MERGE_GRIDS.items() if spec["method"] not in DATA_AWARE]
    assert set(results) == {"pretrained", *(f"fine-tuned {t}" for t in tasks), *methods}
    assert all(set(by_task) == set(tasks) for by_task in results.values())
    merges = [label for label in chosen["methods"] if isinstance(chosen["methods"][label], dict)]
    assert set(merges) == set(methods)
    for label, spec in MERGE_GRIDS.items():  # per-task methods: each task on its own model, that task only
        if spec["method"] in PER_TASK:
            searches = {task: metrics.creator for task, metrics in results[label].items()}
            assert all(list(search.datasets) == [task] for task, search in searches.items())
            assert [search.model.creator.task for search in searches.values()] == list(range(1, len(tasks) + 1))
            assert len({search.model.creator.modulated for search in searches.values()}) == 1
    assert chosen["task_type"] == ("image_classification" if config == "vit_tasks" else "seq2seq")
    if preset == "full":
        assert len(tasks) >= 7 and not any("offline" in str(spec["dataset"]) for spec in chosen["tasks"].values())
    assert report.results == results
