"""A frozen teacher's BatchNorms folded into its convolutions: the same outputs (numbers against
the unfolded network), only the pairs that may fold, a plain Keras file, and the distillation stage
folding a fresh run's teacher on --teacher_batch_norm fold while a run begun without folding
resumes without it."""

import json
import os

import keras
import numpy as np

import knowledge_distillation
import model as resnet
from cnn_compression import batch_norm_folding
from cnn_compression import checkpoints
from conftest import TINY_WIDTH, perturb_batch_norms


def images(count=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3)).astype("float32")


def test_our_resnet50_and_mobilenet_v2_fold_every_batch_norm_and_predict_the_same():
    network = perturb_batch_norms(resnet.build_resnet50(resnet.width_spec(TINY_WIDTH), "cifar", 10))
    mobile = perturb_batch_norms(keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                                                  classes=10))  # depthwise convolutions too
    for original in (network, mobile):
        norms = [layer.name for layer in original.layers if isinstance(layer, keras.layers.BatchNormalization)]
        before = [weight.copy() for weight in original.get_weights()]
        folded, count = batch_norm_folding.fold_batch_norms(original)
        assert count == len(norms) and not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
        assert {layer.name for layer in folded.layers} == {layer.name for layer in original.layers} - set(norms)
        np.testing.assert_allclose(folded.predict(images(), verbose=0), original.predict(images(), verbose=0),
                                   rtol=1e-4, atol=1e-5)
        assert all(np.array_equal(a, b) for a, b in zip(original.get_weights(), before))  # the original untouched


def test_only_a_linear_convolution_read_by_its_batch_norm_alone_folds(tmp_path):
    inputs = keras.Input((32, 32, 3))
    scaled = keras.layers.Rescaling(1 / 255)(inputs)
    activated = keras.layers.Conv2D(8, 3, activation="relu", name="activated")(scaled)
    after_activation = keras.layers.BatchNormalization(name="after_activation")(activated)
    shared = keras.layers.Conv2D(8, 1, name="shared")(after_activation)
    read_twice = keras.layers.BatchNormalization(name="read_twice")(shared)
    plain = keras.layers.Conv2D(8, 1, use_bias=True, name="plain")(keras.layers.Add()([read_twice, shared]))
    folds = keras.layers.BatchNormalization(name="folds")(plain)
    hinted = keras.layers.Conv2D(8, 1, name="hinted")(folds)
    kept = keras.layers.BatchNormalization(name="kept")(hinted)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(kept))
    network = perturb_batch_norms(keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(pooled)))
    assert batch_norm_folding.foldable_pairs(network, keep={"kept"}) == {"plain": "folds"}
    folded, count = batch_norm_folding.fold_batch_norms(network, keep={"kept"})
    assert count == 1 and "folds" not in [layer.name for layer in folded.layers]
    # the kernel and bias of the folded convolution against numpy: gamma (x - mean) / sqrt(var + eps) + beta
    gamma, beta, mean, variance = network.get_layer("folds").get_weights()
    kernel, bias = network.get_layer("plain").get_weights()
    scale = gamma / np.sqrt(variance + network.get_layer("folds").epsilon)
    new_kernel, new_bias = folded.get_layer("plain").get_weights()
    np.testing.assert_allclose(new_kernel, kernel * scale, rtol=1e-6)
    np.testing.assert_allclose(new_bias, (bias - mean) * scale + beta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded.predict(images(), verbose=0), network.predict(images(), verbose=0), rtol=1e-4, atol=1e-6)
    path = str(tmp_path / "folded.h5")
    checkpoints.save_model(folded, path)
    np.testing.assert_allclose(keras.models.load_model(path, compile=False).predict(images(), verbose=0),
                               folded.predict(images(), verbose=0), rtol=1e-6, atol=1e-7)
    assert batch_norm_folding.fold_batch_norms(folded, keep={"kept"}) == (folded, 0)  # nothing left to fold


def test_the_stage_folds_a_fresh_runs_teacher_on_request_and_resumes_a_run_begun_without_folding_as_it_was(tmp_path):
    teacher = perturb_batch_norms(resnet.build_resnet50(resnet.width_spec(TINY_WIDTH), "cifar", 10))
    assert knowledge_distillation.parse_args(["--teacher_path", "t.h5", "--student_compression", "2"]).teacher_batch_norm == "keep"
    args = knowledge_distillation.parse_args(["--teacher_path", "t.h5", "--student_compression", "2",
                                              "--save_folder", str(tmp_path), "--teacher_batch_norm", "fold"])
    hints = [("conv2_block3_out", "conv2_block3_out")]
    running, folded = knowledge_distillation.inference_teacher(teacher, str(tmp_path), args, "fresh", hints)
    assert folded == 53 and "conv2_block3_out" in [layer.name for layer in running.layers]
    stored = {"arguments": {key: value for key, value in vars(args).items() if key != "teacher_batch_norm"}}
    (tmp_path / "config.json").write_text(json.dumps(stored))  # a run begun before the flag
    assert knowledge_distillation.inference_teacher(teacher, str(tmp_path), args, "resume", hints) == (teacher, 0)
    stored["arguments"]["teacher_batch_norm"] = "fold"
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert knowledge_distillation.inference_teacher(teacher, str(tmp_path), args, "resume", hints)[1] == 53
    keep = knowledge_distillation.parse_args(["--teacher_path", "t.h5", "--student_compression", "2",
                                              "--save_folder", str(tmp_path)])
    assert knowledge_distillation.inference_teacher(teacher, str(tmp_path / "new"), keep, "fresh", hints) == (teacher, 0)
    assert os.listdir(tmp_path) == ["config.json"]
