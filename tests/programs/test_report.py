import csv
import json
import pathlib
import subprocess
import sys

import pytest
from sis_util import REPO

ROOT = pathlib.Path(REPO)


def _metrics(tmp_path, name, accuracy):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"accuracy": accuracy, "macro_f1": 0.5, "num_examples": 10}))
    return str(path)


def _run(config_path):
    return subprocess.run([sys.executable, str(ROOT / "code" / "report.py"), str(config_path)], capture_output=True, text=True)


def test_report_tables_and_plots(tmp_path):
    results = {
        "pretrained": {"sst2": _metrics(tmp_path, "a", 0.9), "imdb": _metrics(tmp_path, "b", 0.6)},
        "merged": {"sst2": _metrics(tmp_path, "c", 0.8), "imdb": _metrics(tmp_path, "d", 0.7), "yelp": _metrics(tmp_path, "e", 0.5)},
    }
    sweeps = {"task_arithmetic": {"1.0": results["merged"], "0.5": results["pretrained"]}}
    config = tmp_path / "report.json"
    config.write_text(json.dumps({"results": results, "sweeps": sweeps, "output_dir": str(tmp_path / "out")}))
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr

    rows = list(csv.reader(open(tmp_path / "out" / "results.csv")))
    assert rows[0] == ["model", "sst2", "imdb", "yelp", "average"]
    assert rows[1][0] == "pretrained" and float(rows[1][4]) == pytest.approx(0.75)
    assert rows[1][3] == "nan"  # pretrained was not evaluated on yelp
    assert float(rows[2][4]) == pytest.approx((0.8 + 0.7 + 0.5) / 3)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| merged | 80.0 | 70.0 | 50.0 | 66.7 |" in markdown
    sweep = list(csv.reader(open(tmp_path / "out" / "sweep.csv")))
    assert sweep[1:] == [["task_arithmetic", "0.5", "0.750000"], ["task_arithmetic", "1.0", f"{2 / 3:.6f}"]]
    for png in ("accuracy.png", "sweep.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_input_leaves_no_output(tmp_path):
    config = tmp_path / "report.json"
    config.write_text(json.dumps({"results": {"m": {"sst2": str(tmp_path / "missing.json")}}, "output_dir": str(tmp_path / "out")}))
    proc = _run(config)
    assert proc.returncode == 2
    assert "missing.json" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]

    config.write_text(json.dumps({"results": {"m": {"sst2": 3}}, "output_dir": str(tmp_path / "out"), "colour": "red"}))
    proc = _run(config)
    assert proc.returncode == 2 and "colour" in proc.stderr


def test_accuracy_plot_shows_the_differences(tmp_path):
    sys.path.insert(0, str(ROOT / "code"))
    from modelmerge.report import accuracy_figure

    tasks = ["sst2", "imdb"]
    table = {"pretrained": {"sst2": 0.912, "imdb": 0.763}, "merged": {"sst2": 0.858}, "multitask": {"sst2": 0.8, "imdb": 0.9}}
    fig = accuracy_figure(tasks, table, "t")
    ax = fig.axes[0]
    # The axis starts at the multiple of 5 at least one point below the lowest accuracy (76.3 -> 75), not at 0,
    # and ends above the highest (91.2).
    low, high = ax.get_xlim()
    assert low == 75 and 91.2 < high < 95
    # One row per model from the top: a bar of its average, a marker per task it was evaluated on.
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table)
    averages = [100 * (0.912 + 0.763) / 2, 85.8, 85.0]
    assert [bar.get_width() for bar in ax.patches] == pytest.approx(averages)
    assert [bar.get_y() + bar.get_height() / 2 for bar in ax.patches] == pytest.approx([0, 1, 2])
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the first model at the top
    drawn = {c.get_label(): [x for row in c.get_offsets().tolist() if None not in row for x in row] for c in ax.collections}
    assert drawn["sst2"] == pytest.approx([91.2, 0, 85.8, 1, 80.0, 2])
    assert drawn["imdb"] == pytest.approx([76.3, 0, 90.0, 2])  # "merged" was not evaluated on imdb: no marker
    # The averages stand in figures right of the plot; the legend names every task, right of them.
    fig.canvas.draw()
    figures = [t for t in ax.texts if t.get_text() != "avg."]
    assert [t.get_text() for t in figures] == [f"{v:.1f}" for v in averages]
    assert all(t.get_window_extent().x0 >= ax.get_window_extent().x1 for t in figures)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [*tasks, "average"]
    assert legend.get_window_extent().x0 >= max(t.get_window_extent().x1 for t in figures)
    __import__("matplotlib.pyplot").pyplot.close(fig)


def test_accuracy_plot_stays_readable_with_many_models():
    sys.path.insert(0, str(ROOT / "code"))
    from modelmerge.report import accuracy_figure

    tasks = ["sst2", "rotten_tomatoes", "imdb", "yelp", "amazon"]
    table = {f"method {i} (a parameter=0.{i})": {t: 0.7 + 0.01 * i for t in tasks} for i in range(30)}
    fig = accuracy_figure(tasks, table, "t")
    width, height = fig.get_size_inches()
    assert width <= 8 and height <= 1.4 + 0.3 * 30  # 30 models: a fixed width, a fixed step in height each
    fig.canvas.draw()
    labels = [t.get_window_extent() for t in fig.axes[0].get_yticklabels()]
    assert all(a.y0 >= b.y1 for a, b in zip(labels, labels[1:]))  # the model names do not overlap
    __import__("matplotlib.pyplot").pyplot.close(fig)


def test_report_normalized_accuracy_and_held_out_tasks(tmp_path):
    accuracies = {  # sst2 is θ_0's task: the pretrained model is its own model
        "pretrained": {"sst2": 0.90, "rt": 0.60, "amazon": 0.50},
        "finetuned rt": {"sst2": 0.85, "rt": 0.80, "amazon": 0.55},
        "finetuned amazon": {"sst2": 0.80, "rt": 0.62, "amazon": 0.75},
        "multitask": {"sst2": 0.88, "rt": 0.78, "amazon": 0.72},
        "merge": {"sst2": 0.86, "rt": 0.70, "amazon": 0.60},
        "merge without amazon": {"sst2": 0.87, "rt": 0.76, "amazon": 0.58},
    }
    results = {model: {task: _metrics(tmp_path, f"{model}-{task}".replace(" ", "_"), a) for task, a in by_task.items()}
               for model, by_task in accuracies.items()}
    own = {"sst2": "pretrained", "rt": "finetuned rt", "amazon": "finetuned amazon"}
    held_in = {"merge": ["sst2", "rt", "amazon"], "merge without amazon": ["sst2", "rt"]}
    config = tmp_path / "report.json"
    config.write_text(json.dumps({"results": results, "output_dir": str(tmp_path / "out"), "own_models": own,
                                  "multitask": "multitask", "held_in": held_in}))
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr

    def mean(values):
        return sum(values) / len(values)

    loo = accuracies["merge without amazon"]
    rows = {row["model"]: row for row in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    row = rows["merge without amazon"]
    assert float(row["held_in_average"]) == pytest.approx(mean([0.87, 0.76]), abs=1e-6)
    assert float(row["held_out_average"]) == pytest.approx(0.58, abs=1e-6)
    assert row["held_out_tasks"] == "amazon" and rows["merge"]["held_out_tasks"] == ""
    assert rows["merge"]["held_out_average"] == "nan"  # every task held in
    assert rows["pretrained"]["held_in_average"] == "nan"  # no merge: no split given
    assert float(row["gap_to_multitask"]) == pytest.approx(mean(list(loo.values())) - mean([0.88, 0.78, 0.72]), abs=1e-6)
    assert float(rows["multitask"]["gap_to_multitask"]) == 0

    normalized = {row["model"]: row for row in csv.DictReader(open(tmp_path / "out" / "normalized.csv"))}
    expected = {"sst2": 0.87 / 0.90, "rt": 0.76 / 0.80, "amazon": 0.58 / 0.75}
    row = normalized["merge without amazon"]
    assert [float(row[t]) for t in expected] == pytest.approx(list(expected.values()), abs=1e-6)
    assert float(row["average"]) == pytest.approx(mean(list(expected.values())), abs=1e-6)
    assert float(row["held_in_average"]) == pytest.approx(mean([expected["sst2"], expected["rt"]]), abs=1e-6)
    assert float(row["held_out_average"]) == pytest.approx(expected["amazon"], abs=1e-6)
    assert float(normalized["finetuned rt"]["rt"]) == 1 and float(normalized["pretrained"]["sst2"]) == 1
    assert float(normalized["multitask"]["amazon"]) == pytest.approx(0.72 / 0.75, abs=1e-6)

    markdown = (tmp_path / "out" / "results.md").read_text()
    # the held-out cell in italics; average, held-in, held-out, Δ multitask in % and points
    gap = 100 * (mean(list(loo.values())) - mean([0.88, 0.78, 0.72]))
    assert (f"| merge without amazon | 87.0 | 76.0 | *58.0* | {100 * mean(list(loo.values())):.1f} | 81.5 | 58.0 "
            f"| {gap:.1f} |") in markdown
    assert "## Normalized accuracy" in markdown
    assert f"| *{100 * expected['amazon']:.1f}* |" in markdown
    for png in ("accuracy.png", "normalized.png", "generalization.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_mark_held_out_tasks():
    sys.path.insert(0, str(ROOT / "code"))
    from matplotlib.colors import to_rgba
    from modelmerge.report import accuracy_figure, generalization_figure

    table = {"merge": {"a": 0.8, "b": 0.6, "c": 0.5}, "all": {"a": 0.9, "b": 0.7, "c": 0.7}}
    held_in = {"merge": ["a"], "all": ["a", "b", "c"]}
    fig = accuracy_figure(["a", "b", "c"], table, "t", held_in=held_in)
    faces = {c.get_label(): [tuple(f) for f in c.get_facecolors()] for c in fig.axes[0].collections}
    assert faces["a"][0][3] == 1 and faces["a"][1][3] == 1  # held in everywhere: filled
    assert faces["b"][0] == to_rgba("none") and faces["b"][1][3] == 1  # held out of "merge" only: hollow there
    fig = generalization_figure({"accuracy (%)": table}, held_in)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["merge"]  # "all" has no held-out task
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([80.0, 100 * (0.6 + 0.5) / 2])
    __import__("matplotlib.pyplot").pyplot.close("all")


def test_report_refuses_unknown_labels(tmp_path):
    results = {"m": {"sst2": _metrics(tmp_path, "m", 0.5)}}
    for extra, named in [({"own_models": {"sst2": "nobody"}}, "nobody"), ({"held_in": {"m": ["imdb"]}}, "imdb"),
                         ({"multitask": "mt"}, "mt"), ({"held_in": {"m": "sst2"}}, "held_in.m")]:
        config = tmp_path / "report.json"
        config.write_text(json.dumps({"results": results, "output_dir": str(tmp_path / "out"), **extra}))
        proc = _run(config)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and named in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "out").exists()
