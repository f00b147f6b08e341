"""A few training steps under a --distribute strategy and the same steps on one device, in one
process (the strategy's devices must be set before TensorFlow starts): run by test_distribute.py
(mirrored, 2 logical CPUs) and test_multi_worker.py (each worker of a multi_worker cluster).

    python tests/distributed_steps.py STRATEGY CPU_DEVICES OUTPUT.json  (a cluster's workers: OUTPUT.json.INDEX)

Both runs train the same models from the same weights on the same batches (the sample's first
images, no augmentation, global batch 32): the stage's classifier through
training.compile_classifier (Keras' train_step) and a Distiller (its own train_step, which divides
each replica's loss by the replica count). The models have no BatchNorm, whose statistics a
replica computes over its own share of the batch: with them the two runs are different maths.
Writes both runs' losses of every step, and the largest difference of their final weights.
"""

import argparse
import json
import os
import sys


import cnn_compression  # noqa: E402

STEPS, BATCH = 4, 32


def classifier(name):
    import keras

    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = layers.Dense(10, name="predictions")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Softmax(name="probabilities")(x), name=name)


def train(strategy, args, split):
    """{"classifier"/"distiller": (the loss after every step, starting weights, final weights)} after STEPS steps."""
    import keras

    from cnn_compression import data
    import distillation
    from cnn_compression import training

    dataset = data.make_dataset(split.x_train, split.y_train, BATCH)  # in order, no augmentation

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))

    result = {}
    for kind in ("classifier", "distiller"):
        training.set_seed(0)
        with strategy.scope():
            if kind == "classifier":
                model = trained = classifier("network")
                training.compile_classifier(model, args, STEPS)
            else:
                trained = classifier("student")
                model = distillation.Distiller(trained, classifier("teacher"), (0.7, 0.0, 0.0))
                model.compile(optimizer=training.make_optimizer(args, STEPS))
        start, record = trained.get_weights(), Record()
        model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0, shuffle=False, callbacks=[record])
        result[kind] = (record.losses, start, trained.get_weights())
    return result


def main(argv):
    distribute, cpu_devices, output = argv[0], int(argv[1]), argv[2]
    if "TF_CONFIG" in os.environ:  # a worker of a cluster: one file per worker
        output = f"{output}.{json.loads(os.environ['TF_CONFIG'])['task']['index']}"
    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    import numpy as np
    import tensorflow as tf

    from cnn_compression import data
    from cnn_compression import training

    args = argparse.Namespace(distribute=distribute, cpu_devices=cpu_devices, epoch_num=1, learning_rate=0.1, momentum=0.9,
                              weight_decay=5e-4, label_smoothing=0.1, lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    strategy = training.distribution_strategy(args)
    split = data.load_split("sample", train_size=STEPS * BATCH)
    distributed = train(strategy, args, split)
    single = train(tf.distribute.OneDeviceStrategy("/cpu:0"), args, split)

    def largest_difference(have, want):
        return max(float(np.max(np.abs(a - b))) for a, b in zip(have, want))

    result = {"replicas": strategy.num_replicas_in_sync}
    for kind in ("classifier", "distiller"):
        (losses, start, weights), (single_losses, single_start, single_weights) = distributed[kind], single[kind]
        result[kind] = {"losses": losses, "single_losses": single_losses,
                        "start": largest_difference(start, single_start),  # the same starting point
                        "moved": largest_difference(single_weights, single_start),  # the steps changed the weights
                        "weights": largest_difference(weights, single_weights)}
    with open(output, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
