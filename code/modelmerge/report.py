"""Tables and plots that compare models: accuracy per task per model, and accuracy against a merge's
scaling factor."""
import csv
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_accuracy(metrics_file):
    with open(metrics_file) as f:
        metrics = json.load(f)
    if "accuracy" not in metrics:
        raise ValueError(f"{metrics_file}: no 'accuracy' in metrics {sorted(metrics)}")
    return float(metrics["accuracy"])


def accuracy_table(results):
    """{model: {task: metrics.json}} -> (tasks in first-seen order, {model: {task: accuracy}})."""
    tasks = []
    table = {}
    for model, by_task in results.items():
        table[model] = {}
        for task, metrics_file in by_task.items():
            if task not in tasks:
                tasks.append(task)
            table[model][task] = read_accuracy(metrics_file)
    return tasks, table


def average(values):
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def table_rows(tasks, table):
    """One row per model: [model, accuracy per task (nan where not evaluated), average over its tasks]."""
    rows = []
    for model, accuracies in table.items():
        row = [accuracies.get(task, math.nan) for task in tasks]
        rows.append([model] + row + [average(accuracies.values())])
    return rows


def _percent(value):
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def write_markdown(path, tasks, rows, title=None):
    lines = [f"# {title}", ""] if title else []
    header = ["model"] + tasks + ["average"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        lines.append("| " + " | ".join([row[0]] + [_percent(v) for v in row[1:]]) + " |")
    lines.append("")
    lines.append("Accuracy in %; average over the tasks each model was evaluated on.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(path, tasks, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model"] + tasks + ["average"])
        for row in rows:
            writer.writerow([row[0]] + [f"{v:.6f}" for v in row[1:]])


def fitted_range(values, step=5.0, headroom=0.0):
    """(low, high) of an axis fitted to `values` (in %): from the multiple of `step` at least 1 below the
    smallest down to 0 at the least, to the largest plus `headroom` of the span (room for value labels)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return 0.0, 100.0
    low = max(0.0, step * math.floor((min(finite) - 1) / step))
    top = max(finite) + 1
    return low, top + headroom * (top - low)


def task_colors(count):
    """Distinct colours for `count` tasks (tab10, tab20 beyond ten, a continuous map beyond twenty)."""
    if count <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(count)]
    if count <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(count)]
    return [plt.get_cmap("turbo")(i / (count - 1)) for i in range(count)]


TASK_MARKERS = "osD^vP*Xph<>"


def accuracy_figure(tasks, table, title=None):
    """One row per model, in the table's order from the top: a bar of its average accuracy, a marker for each
    task's accuracy, and the average in figures right of the plot. The figure keeps a readable width however
    many models there are (it grows in height, a fixed step per model); the axis spans the accuracies (not
    0-100, so that the differences people compare show); the legend of the tasks stands right of the plot."""
    models = list(table)
    averages = [100 * average(table[model].values()) for model in models]
    rows = range(len(models))
    fig, ax = plt.subplots(figsize=(8.0, 1.4 + 0.3 * len(models)))
    ax.barh(rows, averages, height=0.6, color="0.82", label="average", zorder=1)
    for task, color, marker in zip(tasks, task_colors(len(tasks)), TASK_MARKERS * len(tasks)):
        values = [100 * table[model].get(task, math.nan) for model in models]
        ax.scatter(values, rows, color=color, marker=marker, s=34, label=task, zorder=2, edgecolors="white", linewidths=0.4)
    low, high = fitted_range([v for model in models for v in [100 * a for a in table[model].values()]] + averages)
    ax.set_xlim(low, high)
    ax.set_ylim(len(models) - 0.5, -0.5)  # the first model at the top
    ax.set_yticks(list(rows), models)
    for row, value in zip(rows, averages):  # the averages as a column of figures right of the plot
        ax.annotate(f"{value:.1f}", (1.0, row), xycoords=("axes fraction", "data"), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.annotate("avg.", (1.0, -0.5), xycoords=("axes fraction", "data"), xytext=(6, 2), textcoords="offset points",
                va="bottom", fontsize=8, fontweight="bold")
    ax.set_xlabel("accuracy (%)")
    ax.xaxis.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or "Accuracy per task", loc="left")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.07, 1.0), frameon=False)
    return fig


def plot_accuracy(path, tasks, table, title=None):
    fig = accuracy_figure(tasks, table, title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def sweep_table(sweeps):
    """{method: {factor: {task: metrics.json}}} -> {method: [(factor, average accuracy), ...] sorted}."""
    curves = {}
    for method, by_factor in sweeps.items():
        points = []
        for factor, by_task in by_factor.items():
            points.append((float(factor), average(read_accuracy(m) for m in by_task.values())))
        curves[method] = sorted(points)
    return curves


def plot_sweep(path, curves, xlabel="scaling factor α", title=None):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, points in curves.items():
        ax.plot([x for x, _ in points], [100 * y for _, y in points], marker="o", label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title or "Average accuracy against the scaling factor")
    ax.grid(alpha=0.3)
    ax.set_ylim(*fitted_range([100 * y for points in curves.values() for _, y in points], step=1.0, headroom=0.05))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_sweep_csv(path, curves):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "scaling_factor", "average_accuracy"])
        for method, points in curves.items():
            for x, y in points:
                writer.writerow([method, x, f"{y:.6f}"])


def write_report(output_dir, results, sweeps=None, title=None):
    """Write results.md, results.csv and accuracy.png (and, with sweeps, sweep.csv and sweep.png) to
    `output_dir`, which must exist."""
    tasks, table = accuracy_table(results)
    rows = table_rows(tasks, table)
    write_markdown(os.path.join(output_dir, "results.md"), tasks, rows, title)
    write_csv(os.path.join(output_dir, "results.csv"), tasks, rows)
    plot_accuracy(os.path.join(output_dir, "accuracy.png"), tasks, table, title)
    if sweeps:
        curves = sweep_table(sweeps)
        write_sweep_csv(os.path.join(output_dir, "sweep.csv"), curves)
        plot_sweep(os.path.join(output_dir, "sweep.png"), curves)
    return rows
