import csv
import json
import subprocess
import sys

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


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
