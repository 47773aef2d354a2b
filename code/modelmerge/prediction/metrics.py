"""Metrics of an evaluation from its per-example rows: accuracy and macro-F1 of a classifier, exact match, loss
and perplexity of a sequence model; the rows of a classifier's predictions."""
import numpy as np

from modelmerge import families


def classification_metrics(labels, predictions):
    """Accuracy, macro-F1 over the classes present in labels or predictions (as scikit-learn), example count."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    f1_scores = []
    for cls in np.union1d(labels, predictions):
        true_positive = np.sum((predictions == cls) & (labels == cls))
        predicted, actual = np.sum(predictions == cls), np.sum(labels == cls)
        f1_scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
    return {
        "accuracy": float(np.mean(labels == predictions)) if len(labels) else 0.0,
        "macro_f1": float(np.mean(f1_scores)) if f1_scores else 0.0,
        "num_examples": int(len(labels)),
    }


def prediction_rows(labels, predictions, probabilities):
    """One `{"index", "label", "prediction", "probabilities"}` dict per example."""
    return [
        {"index": i, "label": int(label), "prediction": int(prediction), "probabilities": [float(p) for p in probs]}
        for i, (label, prediction, probs) in enumerate(zip(labels, predictions, probabilities))
    ]


def sequence_metrics(rows):
    """The metrics of `evaluate_sequences` from its per-example rows."""
    correct = [row["exact_match"] for row in rows]
    counts = [row["num_tokens"] for row in rows]
    loss = float(np.sum([row["nll"] for row in rows]) / max(1, np.sum(counts)))
    # `accuracy` is the exact match again, under the name reports and searches read for every family
    return {"exact_match": families.summary(correct), "accuracy": families.summary(correct), "loss": loss,
            "perplexity": float(np.exp(loss)), "num_examples": len(rows), "num_tokens": int(np.sum(counts))}
