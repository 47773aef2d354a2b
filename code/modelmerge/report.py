"""Tables and plots that compare models: accuracy per task per model, and accuracy against a merge's
scaling factor; as merging papers report them, also normalized accuracy (a model's accuracy on a task over
that task's own fine-tuned model's), the gap to the multitask model, and averages over a merged model's
held-in tasks (those some model that went into the merge was trained on) and held-out tasks (the others)."""
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


def normalized_table(table, own_models):
    """{model: {task: accuracy / the accuracy of the task's own model}}; `own_models`: {task: model label}.
    Tasks without an own model are left out."""
    return {model: {task: accuracy / table[own_models[task]][task]
                    for task, accuracy in accuracies.items() if task in own_models}
            for model, accuracies in table.items()}


def held_out_tasks(model, table, held_in):
    """The tasks `model` was evaluated on that are not among its held-in tasks (none for a model not in `held_in`)."""
    if model not in held_in:
        return []
    return [task for task in table[model] if task not in held_in[model]]


def split_averages(model, values, held_in):
    """(average over the held-in tasks, average over the held-out tasks) of `model`'s {task: value}; nan for a
    model without held-in tasks given, or a side without tasks."""
    if model not in held_in:
        return math.nan, math.nan
    inside = [v for task, v in values.items() if task in held_in[model]]
    outside = [v for task, v in values.items() if task not in held_in[model]]
    return average(inside), average(outside)


def gap_to(reference, accuracies, table):
    """Average accuracy minus the `reference` model's average over the same tasks (nan where it lacks one)."""
    if reference is None or any(task not in table[reference] for task in accuracies):
        return math.nan
    return average(accuracies.values()) - average(table[reference][task] for task in accuracies)


def summary_rows(tasks, table, held_in, multitask=None):
    """table_rows plus, with `held_in`, the held-in and held-out averages, and with `multitask`, the gap of the
    average to the multitask model's."""
    rows = []
    for row in table_rows(tasks, table):
        model = row[0]
        if held_in:
            row += list(split_averages(model, table[model], held_in))
        if multitask is not None:
            row.append(gap_to(multitask, table[model], table))
        rows.append(row)
    return rows


def _percent(value):
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def summary_header(tasks, held_in, multitask=None):
    return (["model"] + tasks + ["average"] + (["held-in", "held-out"] if held_in else [])
            + (["Δ multitask"] if multitask is not None else []))


def _markdown_table(header, rows, tasks, table, held_in):
    """Figures in %, the Δ column in points; cells of a model's held-out tasks in italics."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out = set(held_out_tasks(row[0], table, held_in))
        cells = [_percent(v) for v in row[1:]]
        cells = [f"*{cell}*" if i < len(tasks) and tasks[i] in out else cell for i, cell in enumerate(cells)]
        lines.append("| " + " | ".join([row[0]] + cells) + " |")
    return lines


def write_markdown(path, tasks, table, title=None, *, held_in=None, multitask=None, normalized=None, own_models=None):
    held_in = held_in or {}
    lines = [f"# {title}", ""] if title else []
    lines += _markdown_table(summary_header(tasks, held_in, multitask), summary_rows(tasks, table, held_in, multitask),
                             tasks, table, held_in)
    lines.append("")
    lines.append("Accuracy in %; average over the tasks each model was evaluated on.")
    if held_in:
        lines.append("held-in: the tasks some model that went into the merge was trained on; held-out (in italics): "
                     "the others.")
    if multitask is not None:
        lines.append(f"Δ multitask: the average minus {multitask}'s over the same tasks, in points.")
    if normalized is not None:
        lines += ["", "## Normalized accuracy", ""]
        lines += _markdown_table(summary_header(tasks, held_in), summary_rows(tasks, normalized, held_in),
                                 tasks, normalized, held_in)
        lines.append("")
        references = ", ".join(f"{task}: {model}" for task, model in own_models.items())
        lines.append(f"Accuracy over the accuracy of the task's own fine-tuned model ({references}), in %.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(path, tasks, table, *, held_in=None, multitask=None):
    """The summary rows in fractions, and, with `held_in`, each model's held-out tasks (';'-separated)."""
    held_in = held_in or {}
    header = summary_header(tasks, held_in, multitask)
    header = [{"held-in": "held_in_average", "held-out": "held_out_average", "Δ multitask": "gap_to_multitask"}.get(h, h)
              for h in header]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header + (["held_out_tasks"] if held_in else []))
        for row in summary_rows(tasks, table, held_in, multitask):
            extra = [";".join(held_out_tasks(row[0], table, held_in))] if held_in else []
            writer.writerow([row[0]] + [f"{v:.6f}" for v in row[1:]] + extra)


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


def accuracy_figure(tasks, table, title=None, *, held_in=None, xlabel="accuracy (%)"):
    """One row per model, in the table's order from the top: a bar of its average accuracy, a marker for each
    task's accuracy (hollow where the task is held out for that model, see `held_in`), and the average in figures
    right of the plot. The figure keeps a readable width however many models there are (it grows in height, a
    fixed step per model); the axis spans the accuracies (not 0-100, so that the differences people compare
    show); the legend of the tasks stands right of the plot."""
    held_in = held_in or {}
    models = list(table)
    averages = [100 * average(table[model].values()) for model in models]
    rows = range(len(models))
    fig, ax = plt.subplots(figsize=(8.0, 1.4 + 0.3 * len(models)))
    ax.barh(rows, averages, height=0.6, color="0.82", label="average", zorder=1)
    for task, color, marker in zip(tasks, task_colors(len(tasks)), TASK_MARKERS * len(tasks)):
        shown = [row for row, model in zip(rows, models) if task in table[model]]
        values = [100 * table[models[row]][task] for row in shown]
        out = [task in held_out_tasks(models[row], table, held_in) for row in shown]
        ax.scatter(values, shown, marker=marker, s=34, label=task, zorder=2, linewidths=[1.2 if o else 0.4 for o in out],
                   facecolors=["none" if o else color for o in out], edgecolors=[color if o else "white" for o in out])
    low, high = fitted_range([v for model in models for v in [100 * a for a in table[model].values()]] + averages)
    ax.set_xlim(low, high)
    ax.set_ylim(len(models) - 0.5, -0.5)  # the first model at the top
    ax.set_yticks(list(rows), models)
    for row, value in zip(rows, averages):  # the averages as a column of figures right of the plot
        ax.annotate(f"{value:.1f}", (1.0, row), xycoords=("axes fraction", "data"), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.annotate("avg.", (1.0, -0.5), xycoords=("axes fraction", "data"), xytext=(6, 2), textcoords="offset points",
                va="bottom", fontsize=8, fontweight="bold")
    ax.set_xlabel(xlabel + (" (hollow: held-out task)" if any(held_out_tasks(m, table, held_in) for m in models) else ""))
    ax.xaxis.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or "Accuracy per task", loc="left")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.07, 1.0), frameon=False)
    return fig


def plot_accuracy(path, tasks, table, title=None, **options):
    fig = accuracy_figure(tasks, table, title, **options)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def generalization_figure(views, held_in, title=None):
    """Held-in against held-out: for each model with held-out tasks, a bar of its average over its held-in tasks
    and one over its held-out tasks; one panel per view ({"accuracy (%)": table, "normalized accuracy (%)": ...})."""
    first = next(iter(views.values()))
    models = [model for model in first if held_out_tasks(model, first, held_in)]
    fig, axes = plt.subplots(1, len(views), figsize=(4.5 * len(views), 1.4 + 0.45 * len(models)), squeeze=False,
                             sharey=True)
    rows = range(len(models))
    for ax, (xlabel, table) in zip(axes[0], views.items()):
        inside, outside = zip(*[[100 * v for v in split_averages(model, table[model], held_in)] for model in models])
        ax.barh([r - 0.2 for r in rows], inside, height=0.4, color="tab:blue", label="held-in")
        ax.barh([r + 0.2 for r in rows], outside, height=0.4, color="tab:orange", label="held-out")
        ax.set_xlim(*fitted_range(list(inside) + list(outside), headroom=0.05))
        ax.set_ylim(len(models) - 0.5, -0.5)
        ax.set_yticks(list(rows), models)
        ax.set_xlabel(xlabel)
        ax.xaxis.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_title(title or "Held-in against held-out tasks", loc="left")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return fig


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


def write_report(output_dir, results, sweeps=None, title=None, *, own_models=None, multitask=None, held_in=None):
    """Write results.md, results.csv and accuracy.png (with `own_models`, also normalized.csv and normalized.png;
    with held-out tasks in `held_in`, generalization.png; with sweeps, sweep.csv and sweep.png) to `output_dir`,
    which must exist. `own_models`: {task: label of the task's own fine-tuned model}; `multitask`: the label of
    the multitask model; `held_in`: {label: [the tasks its merge's models were trained on]}. Returns the
    accuracies, {model: {task: accuracy}}."""
    held_in = held_in or {}
    tasks, table = accuracy_table(results)
    _check_labels(tasks, table, own_models or {}, multitask, held_in)
    if not any(held_out_tasks(model, table, held_in) for model in table):
        held_in = {}  # every task held in for every model: no held-out columns to show
    normalized = normalized_table(table, own_models) if own_models else None
    path = os.path.join
    write_markdown(path(output_dir, "results.md"), tasks, table, title, held_in=held_in, multitask=multitask,
                   normalized=normalized, own_models=own_models)
    write_csv(path(output_dir, "results.csv"), tasks, table, held_in=held_in, multitask=multitask)
    plot_accuracy(path(output_dir, "accuracy.png"), tasks, table, title, held_in=held_in)
    views = {"accuracy (%)": table}
    if normalized is not None:
        write_csv(path(output_dir, "normalized.csv"), tasks, normalized, held_in=held_in)
        plot_accuracy(path(output_dir, "normalized.png"), tasks, normalized, f"{title or 'Accuracy'}: normalized",
                      held_in=held_in, xlabel="normalized accuracy (%)")
        views["normalized accuracy (%)"] = normalized
    if held_in:
        fig = generalization_figure(views, held_in, title)
        fig.savefig(path(output_dir, "generalization.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    if sweeps:
        curves = sweep_table(sweeps)
        write_sweep_csv(path(output_dir, "sweep.csv"), curves)
        plot_sweep(path(output_dir, "sweep.png"), curves)
    return table


def _check_labels(tasks, table, own_models, multitask, held_in):
    """Every model and task named must be in the results; a task's own model must be evaluated on it."""
    for label in [*own_models.values(), *([multitask] if multitask is not None else []), *held_in]:
        if label not in table:
            raise ValueError(f"model {label!r} is not in the results (models: {', '.join(table)})")
    for task in [*own_models, *(t for named in held_in.values() for t in named)]:
        if task not in tasks:
            raise ValueError(f"task {task!r} is not in the results (tasks: {', '.join(tasks)})")
    for task, model in own_models.items():
        if task not in table[model]:
            raise ValueError(f"own model {model!r} of task {task!r} was not evaluated on it")
        if table[model][task] == 0:
            raise ValueError(f"own model {model!r} of task {task!r} has accuracy 0 there: nothing to normalize by")
