"""The contract every stage takes from a model it did not build: a functional classifier of CIFAR images."""

from cnn_compression.errors import UserError

INPUT_SHAPE = (32, 32, 3)  # raw 0-255 pixels: any preprocessing lives inside the model


def check_any_model(network, class_num, stage="pruning"):
    """Refuse a model the stage cannot train or measure: it must take one 32x32x3 image batch and
    give one row of `class_num` class scores (softmax probabilities or logits). `stage` names the
    stage in the message."""
    shape = network.input_shape
    if isinstance(shape, list) or len(shape) != 4 or any(size not in (None, wanted) for size, wanted in zip(shape[1:], INPUT_SHAPE)):
        raise UserError(f"{network.name} takes input {shape}: the {stage} stage needs one (None, 32, 32, 3) image input")
    outputs = network.output_shape
    if isinstance(outputs, list) or len(outputs) != 2 or outputs[-1] != class_num:
        raise UserError(f"{network.name} outputs {outputs}: the {stage} stage needs one (None, {class_num}) "
                        "row of class scores")
