"""model.py: the shared ResNet50 against keras.applications, its width specs and its counts."""

import keras
import numpy as np
import pytest

import model as resnet
from cnn_compression import checkpoints


@pytest.fixture(scope="module")
def applications_resnet():
    return keras.applications.ResNet50(weights=None, classes=10, input_shape=(32, 32, 3))


def test_full_width_matches_keras_applications(applications_resnet):
    ours = resnet.build_resnet50()
    assert ours.count_params() == applications_resnet.count_params() == 23_608_202
    assert resnet.parameter_count(resnet.full_width_spec()) == 23_608_202
    theirs = [layer.name for layer in applications_resnet.layers]
    mine = [layer.name for layer in ours.layers]
    # Same names in the same order (the input layer's name is uniquified by Keras when several
    # models share a process); ours adds only the input normalisation and the softmax.
    assert [name for name in mine if name not in ("input_normalization", "probabilities")][1:] == theirs[1:]
    for name in ("conv1_conv", "conv3_block4_2_conv", "conv5_block1_0_conv", "predictions"):
        assert ours.get_layer(name).get_config()["name"] == name
        assert [w.shape for w in ours.get_layer(name).weights] == [w.shape for w in applications_resnet.get_layer(name).weights]


def test_keras_applications_weights_load_by_name_with_identical_outputs(applications_resnet, tmp_path):
    rng = np.random.default_rng(0)
    # Non-trivial BatchNorm statistics, so a layer loaded in the wrong place would show.
    for layer in applications_resnet.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, variance.shape)])
    path = str(tmp_path / "applications.h5")
    applications_resnet.save(path)
    ours = resnet.build_resnet50()
    loaded, skipped = checkpoints.load_weights_by_name(ours, path)
    assert loaded == sum(1 for layer in applications_resnet.layers if layer.weights)
    assert skipped == []
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype("float32")
    normalised = (images - np.array(resnet.CIFAR10_MEAN)) / np.array(resnet.CIFAR10_STD)
    expected = applications_resnet.predict(normalised.astype("float32"), verbose=0)
    np.testing.assert_allclose(ours.predict(images, verbose=0), expected, atol=1e-5)


def test_imagenet_head_of_another_shape_is_skipped(tmp_path):
    source = resnet.build_resnet50(resnet.width_spec(0.0625), class_num=7)
    path = str(tmp_path / "seven_classes.h5")
    checkpoints.save_model(source, path)
    target = resnet.build_resnet50(resnet.width_spec(0.0625), class_num=10)
    loaded, skipped = checkpoints.load_weights_by_name(target, path)
    assert skipped == ["predictions"]
    np.testing.assert_array_equal(target.get_layer("conv5_block3_3_conv").get_weights()[0],
                                  source.get_layer("conv5_block3_3_conv").get_weights()[0])


def random_spec(rng):
    return {"stem": int(rng.integers(1, 9)),
            "blocks": [[int(rng.integers(1, 9)), int(rng.integers(1, 9))] for _ in range(16)],
            "stages": [int(rng.integers(1, 17)) for _ in range(4)]}


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_random_width_spec_survives_plain_h5_round_trip(tmp_path, stem):
    spec = random_spec(np.random.default_rng(3 if stem == "cifar" else 4))
    original = resnet.build_resnet50(spec, stem=stem, class_num=10)
    assert original.count_params() == resnet.parameter_count(spec, stem, 10)
    path = str(tmp_path / "random.h5")
    checkpoints.save_model(original, path)
    reopened = keras.models.load_model(path, compile=False)  # plain Keras, no custom objects
    assert resnet.describe_model(reopened) == (spec, stem, 10, (32, 32, 3))
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(reopened.predict(images, verbose=0), original.predict(images, verbose=0), atol=1e-6)


def test_macs_match_a_hand_count():
    spec = {"stem": 2, "blocks": [[1, 1]] * 16, "stages": [2, 2, 2, 2]}
    network = resnet.build_resnet50(spec, stem="imagenet", class_num=10)
    per_layer, total = resnet.count_macs(network)
    # 32x32 -> conv1 7x7/2 -> 16x16 -> max-pool 3x3/2 -> 8x8 (stage 2) -> 4x4 -> 2x2 -> 1x1 (stage 5).
    assert per_layer["conv1_conv"] == 16 * 16 * 7 * 7 * 3 * 2
    assert per_layer["conv2_block1_0_conv"] == 8 * 8 * 2 * 2
    assert per_layer["conv2_block1_2_conv"] == 8 * 8 * 3 * 3 * 1 * 1
    assert per_layer["conv3_block1_1_conv"] == 4 * 4 * 2 * 1  # stride 2 on the 1x1, as keras.applications
    assert per_layer["conv5_block3_3_conv"] == 1 * 1 * 1 * 2
    assert per_layer["predictions"] == 2 * 10
    spatial = {"conv2": 64, "conv3": 16, "conv4": 4, "conv5": 1}
    blocks = 0
    for index, name in enumerate(resnet.block_names()):
        area = spatial[name[:5]]
        shortcut = area * 2 * 2 if name.endswith("block1") else 0
        blocks += shortcut + area * (2 * 1 + 9 * 1 * 1 + 1 * 2)
    assert total == 16 * 16 * 49 * 3 * 2 + blocks + 20


def test_full_width_macs():
    assert resnet.count_macs(resnet.build_resnet50())[1] == pytest.approx(78.7e6, rel=1e-3)
    assert resnet.count_macs(resnet.build_resnet50(stem="cifar"))[1] == pytest.approx(1.22e9, rel=2e-3)


def test_width_multiplier_scales_every_layer():
    spec = resnet.width_spec(0.25)
    assert spec["stem"] == 16 and spec["stages"] == [64, 128, 256, 512]
    assert spec["blocks"][0] == [16, 16] and spec["blocks"][-1] == [128, 128]
    with pytest.raises(ValueError):
        resnet.width_spec(0)


def test_named_features_are_reachable():
    network = resnet.build_resnet50(resnet.width_spec(0.0625))
    names = resnet.stage_output_names() + resnet.inner_activation_names()
    assert resnet.stage_output_names() == ["conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"]
    assert len(resnet.inner_activation_names()) == 32
    features = resnet.feature_model(network, names).predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0)
    assert [f.shape[-1] for f in features[:4]] == resnet.width_spec(0.0625)["stages"]
    assert all((f >= 0).all() for f in features)  # post-ReLU
    logits = resnet.logits_model(network).predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0)
    probabilities = network.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0)
    np.testing.assert_allclose(probabilities, keras.ops.convert_to_numpy(keras.ops.softmax(logits)), atol=1e-6)


def test_foreign_model_is_rejected():
    foreign = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
    with pytest.raises(resnet.NotOurResNetError):
        resnet.describe_model(foreign)
