"""Saved models reloaded with plain Keras (`keras.models.load_model`) and measured on the test set,
against the test accuracy their records report: whether a results table's rows come back from the
checkpoints beside them."""

import dataclasses

from cnn_compression import checkpoints
from cnn_compression import metrics
from cnn_compression.errors import UserError

# Under one image in 10,000: a reloaded float32 model predicts what the stage measured, batch for
# batch; anything more is a different model or different images.
TOLERANCE = 1e-4


@dataclasses.dataclass
class Claim:
    """A recorded test accuracy and the model file said to give it."""

    label: str
    model_path: str
    test_accuracy: float
    test_images: int = None  # how many test images the record was measured on, where it says


def check_claims(claims, x_test, y_test, batch_size=500, report=print):
    """Loads each claim's model with plain Keras and measures it on (x_test, y_test), reporting one
    line per model; returns the lines. Every model is measured before a UserError names all the
    claims their models do not give back."""
    lines, failures = [], []
    for claim in claims:
        if claim.test_images is not None and claim.test_images != len(y_test):
            raise UserError(f"{claim.label} was measured on {claim.test_images:,} test images, this test set "
                            f"has {len(y_test):,}: give the data set it was measured on")
        network = checkpoints.load_model(claim.model_path, claim.label)
        measured = metrics.accuracy(network, x_test, y_test, batch_size)
        agrees = abs(measured - claim.test_accuracy) <= TOLERANCE
        line = (f"{claim.label}: {claim.model_path} gives {100 * measured:.2f}% with plain Keras, "
                f"recorded {100 * claim.test_accuracy:.2f}%" + ("" if agrees else "  <- differs"))
        report(line)
        lines.append(line)
        if not agrees:
            failures.append(f"{claim.label} ({100 * measured:.2f}%, recorded {100 * claim.test_accuracy:.2f}%)")
    if failures:
        raise UserError(f"{len(failures)} of {len(claims)} saved models do not give their recorded test accuracy: "
                        + "; ".join(failures))
    return lines


def test_set(dataset, data_dir=None):
    """(images, labels) of a data set's test split: 'cifar10' (from data_dir, else where data.py
    finds it) or the bundled 'sample'."""
    from cnn_compression import data

    if dataset == "sample":
        _, _, x_test, y_test = data.load_sample()
    elif dataset == "cifar10":
        _, _, x_test, y_test, _ = data.load_cifar10(data_dir)
    else:
        raise UserError(f"cannot check a model measured on the data set {dataset!r}")
    return x_test, y_test.reshape(-1)


def check_rows(rows, data_dir=None, report=print):
    """The results table's rows (results.Row) whose model is at hand, each against its recorded test
    accuracy on the test set it was measured on; the rows without a saved model are reported as such.
    Returns the lines reported; raises UserError as check_claims does."""
    measured = [row for row in rows if row.test_acc is not None]
    lines = [f"{row.name}: no saved model at hand, not checked" for row in measured if row.model_path is None]
    for line in lines:
        report(line)
    checkable = [row for row in measured if row.model_path is not None]
    for dataset in sorted({row.dataset for row in checkable}):
        claims = [Claim(row.name, row.model_path, row.test_acc, row.test_images) for row in checkable if row.dataset == dataset]
        lines += check_claims(claims, *test_set(dataset, data_dir), report=report)
    return lines
