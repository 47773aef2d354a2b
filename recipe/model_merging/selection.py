"""Choosing a merge method's setting on the validation splits, and the report label that names it: the one place
for config/merging_methods.py (which reads the accuracies of tk.Variables while it builds its graph) and the
family suites' ReportJob (which reads them from metrics.json files when it runs). Accuracies come as
{value: {task: accuracy}}, the values in the order they were merged; ties go to the first."""


def average(accuracies):
    """The mean of {task: accuracy}."""
    return sum(accuracies.values()) / len(accuracies)


def best_value(by_value):
    """The setting with the best average validation accuracy."""
    return max(by_value, key=lambda value: average(by_value[value]))


def best_per_task(by_value, tasks):
    """{task: the setting best on that task's validation split} (as TALL masks choose each task's λ_t, Wang et
    al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024)."""
    return {task: max(by_value, key=lambda value: by_value[value][task]) for task in tasks}


def setting_label(label, parameter, value):
    """`label` with its chosen setting, e.g. "ties (density=0.3)" (just `label` for a method merged once)."""
    return label if parameter is None else f"{label} ({parameter}={value})"


def per_task_label(label, parameter, chosen):
    """`label` with each task's chosen setting (`chosen`: {task: value}), e.g. "tall masks (λ per task=0.2/0.6)"."""
    return f"{label} ({parameter} per task={'/'.join(str(value) for value in chosen.values())})"
