"""Channel groups traced from any functional model, surgery from them, importances: keras.applications
models (random weights, 32x32 inputs), a small model of every followed layer kind, our ResNet50."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnn_compression import channel_graph
from cnn_compression import channel_importance
import model as resnet
import prune
import pruning_iteration

APPLICATIONS = {
    "ResNet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "ResNet50V2": lambda: keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "MobileNetV2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35,
                                                          classifier_activation=None),
    "VGG16": lambda: keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "DenseNet121": lambda: keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10,
                                                                classifier_activation=None),
}


def every_followed_layer():
    """A small model of the layer kinds the trace follows beyond the applications': split and
    concatenated groups tied through an Add, a Flatten of 2x2 positions before a Dense, transposed,
    separable and depthwise convolutions, per-channel PReLU, Rescaling and Normalization."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = layers.PReLU(shared_axes=[1, 2], name="stem_prelu")(x)
    x = layers.Rescaling(scale=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0], name="stem_scale")(x)
    x = layers.Normalization(axis=-1, name="stem_normalization")(x)
    separable = layers.SeparableConv2D(5, 3, padding="same", name="separable")(x)
    separable = layers.LeakyReLU(0.1, name="leaky")(separable)
    up = layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="transpose")(x)
    up = layers.Cropping2D(4, name="crop")(up)
    up = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(up)
    side = layers.Conv2D(3, 1, name="side")(x)
    trunk = layers.Conv2D(7, 1, name="trunk")(x)  # channels 0-3 tied to transpose, 4-6 to side
    merged = layers.Add(name="add")([trunk, layers.Concatenate(name="cat")([up, side])])
    merged = layers.BatchNormalization(name="bn")(merged)
    merged = layers.ReLU(name="relu")(merged)
    merged = layers.SpatialDropout2D(0.1, name="spatial_dropout")(merged)
    x = layers.Concatenate(name="cat2")([merged, separable])  # 12 channels
    x = layers.MaxPooling2D(4, name="pool")(x)  # 2 x 2 x 12
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(6, activation="relu", name="hidden")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(3, name="logits")(x)
    built = keras.Model(inputs, outputs, name="every_followed_layer")
    rng = np.random.default_rng(4)
    normalization = built.get_layer("stem_normalization")
    normalization.set_weights([rng.normal(0, 0.5, 6).astype("float32"), rng.uniform(0.5, 2, 6).astype("float32"),
                               np.array(1, "int64")])
    normalization.finalize_state()
    bn = built.get_layer("bn")
    bn.set_weights([rng.uniform(0.5, 1.5, 7).astype("float32"), rng.uniform(-0.3, 0.3, 7).astype("float32"),
                    rng.normal(0, 0.1, 7).astype("float32"), rng.uniform(0.5, 1.5, 7).astype("float32")])
    return built


MODELS = {**APPLICATIONS, "every_followed_layer": every_followed_layer}


def outputs_of(network, images):
    return keras.ops.convert_to_numpy(network(images, training=False))


def random_images(network, count=4, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (count, *network.input_shape[1:])).astype("float32")


def kill_channels(network, dead):
    """Make the channels `dead` ({group name: (group, channel indices)}) exactly zero wherever they
    are read: zero their filters and bias in every producer and every per-channel weight of the
    carriers (a variance stays, BatchNorm then outputs beta = 0). Every followed layer maps zero
    to zero, except a sigmoid, whose output only ever multiplies a zero channel of the same group
    (squeeze-excitation)."""
    layers = {layer.name: layer for layer in network.layers}
    values = {}  # layer name -> its weights, each layer read and written once
    for group, channels in dead.values():
        for role in ("producers", "carriers"):
            for entry in group[role]:
                layer = layers[entry["layer"]]
                arrays = values.setdefault(layer.name, layer.get_weights())
                for weight, value in zip(layer.weights, arrays):
                    axis = entry["weights"].get(weight.name)
                    if axis is not None and "variance" not in weight.name:
                        index = [slice(None)] * value.ndim
                        index[axis] = entry["indices"][channels].reshape(-1)
                        value[tuple(index)] = 0
    for name, arrays in values.items():
        layer = layers[name]
        layer.set_weights(arrays)
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()


def prune_dead_channels_unchanged(network, groups, name, dead, keep):
    """Kill channels `dead` of group `name`, prune the group down to `keep` (the complement) and
    check the pruned model computes what the original with those channels dead computes; returns it."""
    group = next(group for group in groups if group["name"] == name)
    kill_channels(network, {name: (group, dead)})
    images = random_images(network, count=3)
    before = outputs_of(network, images)
    pruned = prune.prune_groups(network, groups, {name: keep})
    np.testing.assert_allclose(outputs_of(pruned, images), before, rtol=0, atol=1e-5 * np.abs(before).max())
    return pruned


def expected_parameters(network, groups, keep):
    """Parameters once the channels outside `keep` are removed, from the original weight shapes
    and the positions the groups name (independent of the surgery's slicing)."""
    removed = {}
    for group in groups:
        if group["name"] not in keep:
            continue
        gone = prune.removed_channels(group["width"], keep[group["name"]])
        for role in ("producers", "consumers", "carriers"):
            for entry in group[role]:
                for weight, axis in entry["weights"].items():
                    removed.setdefault((entry["layer"], weight, axis), set()).update(entry["indices"][gone].reshape(-1).tolist())
    total = 0
    for layer in network.layers:
        for weight in layer.weights:
            shape = list(weight.shape)
            for (name, weight_name, axis), positions in removed.items():
                if name == layer.name and weight_name == weight.name:
                    shape[axis] -= len(positions)
            total += int(np.prod(shape, dtype=np.int64))
    return total


@pytest.fixture(scope="module", params=list(MODELS))
def surgery(request):
    """One model per case: traced, random channels of every prunable group made dead in place
    (outputs recorded before and after), then removed."""
    keras.utils.set_random_seed(0)
    network = MODELS[request.param]()
    groups = channel_graph.trace_channel_groups(network)
    images = random_images(network)
    original = outputs_of(network, images)
    rng = np.random.default_rng(2)
    keep, dead = {}, {}
    for group in channel_graph.prunable_groups(groups):
        keep[group["name"]] = np.sort(rng.choice(group["width"], int(rng.integers(1, group["width"])), replace=False))
        dead[group["name"]] = (group, prune.removed_channels(group["width"], keep[group["name"]]))
    kill_channels(network, dead)
    before = outputs_of(network, images)
    pruned = prune.prune_groups(network, groups, keep)
    return {"name": request.param, "network": network, "groups": groups, "keep": keep, "images": images,
            "original": original, "before": before, "pruned": pruned, "after": outputs_of(pruned, images)}


def test_every_weight_axis_is_covered_once_and_only_input_and_output_are_frozen(surgery):
    network, groups = surgery["network"], surgery["groups"]
    positions = {}
    for group in groups:
        for role in ("producers", "consumers", "carriers"):
            for entry in group[role]:
                assert entry["indices"].shape[0] == group["width"], (group["name"], entry["layer"])
                for weight, axis in entry["weights"].items():
                    positions.setdefault((entry["layer"], weight, axis), []).extend(entry["indices"].reshape(-1).tolist())
    # every channel axis of every weight is split among the groups exactly: no position missed or doubled
    for layer in network.layers:
        for weight in layer.weights:
            if weight.name == "count":  # Normalization's sample count is not per channel
                continue
            axes = [(axis, found) for (name, weight_name, axis), found in positions.items()
                    if name == layer.name and weight_name == weight.name]
            assert axes, f"{layer.name}/{weight.name} is in no channel group"
            for axis, found in axes:
                assert sorted(found) == list(range(weight.shape[axis])), f"{layer.name}/{weight.name} axis {axis}"
    frozen = channel_graph.frozen_groups(groups)
    input_name = network.inputs[0]._keras_history.operation.name
    output_name = network.outputs[0]._keras_history.operation.name
    assert frozen == {input_name: [f"model input {input_name}"], output_name: ["model output"]}
    assert len({group["name"] for group in groups}) == len(groups)


def test_removing_dead_channels_changes_no_output(surgery):
    before, after, original = surgery["before"], surgery["after"], surgery["original"]
    scale = np.abs(before).max()
    assert scale > 0 and np.ptp(before, axis=0).max() > 1e-3 * scale  # the images are told apart
    assert np.abs(before - original).max() > 1e-3 * scale  # the dead channels did matter
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * scale)


def test_pruned_model_has_the_expected_widths_and_parameters_and_survives_h5(surgery, tmp_path):
    network, groups, keep, pruned = surgery["network"], surgery["groups"], surgery["keep"], surgery["pruned"]
    assert keep and all(len(keep[group["name"]]) < group["width"] for group in groups if group["name"] in keep)
    # traced again, the smaller model has the same groups at the kept widths
    widths = {group["name"]: group["width"] for group in channel_graph.trace_channel_groups(pruned)}
    assert widths == {group["name"]: len(keep.get(group["name"], range(group["width"]))) for group in groups}
    assert pruned.count_params() == expected_parameters(network, groups, keep) < network.count_params()
    path = str(tmp_path / "pruned.h5")
    pruned.save(path)
    reopened = keras.models.load_model(path, compile=False)  # plain Keras, no custom objects
    np.testing.assert_array_equal(outputs_of(reopened, surgery["images"]), surgery["after"])


def test_size_counter_predicts_the_pruned_models_parameters_and_macs(surgery):
    """The target search's prediction from the groups alone equals what the surgery builds."""
    network, groups, keep, pruned = surgery["network"], surgery["groups"], surgery["keep"], surgery["pruned"]
    parameters, macs = prune.size_counter(network, groups)({name: len(indices) for name, indices in keep.items()})
    assert parameters == pruned.count_params()
    assert macs == prune.size_counter(pruned, [])({})[1] < prune.size_counter(network, [])({})[1]


def test_kept_filters_are_the_chosen_ones(surgery):
    """Every pruned weight equals the original with the kept positions taken along each channel
    axis (numpy's take against the surgery's delete)."""
    network, groups, keep, pruned = surgery["network"], surgery["groups"], surgery["keep"], surgery["pruned"]
    kept = {}
    for group in groups:
        chosen = keep.get(group["name"], np.arange(group["width"]))
        for role in ("producers", "consumers", "carriers"):
            for entry in group[role]:
                for weight, axis in entry["weights"].items():
                    kept.setdefault((entry["layer"], weight, axis), []).extend(entry["indices"][chosen].reshape(-1).tolist())
    for layer in network.layers:
        for weight, value, new in zip(layer.weights, layer.get_weights(), pruned.get_layer(layer.name).get_weights()):
            for (name, weight_name, axis), positions in kept.items():
                if name == layer.name and weight_name == weight.name:
                    value = np.take(value, sorted(positions), axis=axis)
            np.testing.assert_array_equal(new, value, err_msg=f"{layer.name}/{weight.name}")


# ---------------------------------------------------------------------------------------------
# Index mappings, importances


@pytest.fixture(scope="module")
def small():
    keras.utils.set_random_seed(0)
    network = every_followed_layer()
    return network, {group["name"]: group for group in channel_graph.trace_channel_groups(network)}


def test_concatenate_offsets_flatten_blocks_and_split_groups(small):
    _, groups = small
    assert sorted(groups) == ["hidden", "image", "logits", "separable", "side", "stem", "transpose"]
    entry = {name: {e["layer"]: e for role in ("producers", "consumers", "carriers") for e in groups[name][role]}
             for name in groups}
    # trunk's 7 filters are split: 0-3 tied to the transposed conv, 4-6 to the side conv, by the Add
    np.testing.assert_array_equal(entry["transpose"]["trunk"]["indices"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(entry["side"]["trunk"]["indices"][:, 0], [4, 5, 6])
    assert entry["transpose"]["transpose"]["weights"] == {"kernel": -2, "bias": 0}  # (h, w, out, in)
    # cat2 = [7 merged channels, 5 separable ones], pooled to 2 x 2, flattened: channel c at rows c + 12 s
    np.testing.assert_array_equal(entry["separable"]["hidden"]["indices"], [[7 + c + 12 * s for s in range(4)] for c in range(5)])
    np.testing.assert_array_equal(entry["side"]["hidden"]["indices"], [[4 + c + 12 * s for s in range(4)] for c in range(3)])
    assert set(entry["transpose"]) == {"transpose", "trunk", "depthwise", "bn", "hidden"}
    assert entry["stem"]["stem_scale"]["config"] == {"scale": "slice"}
    assert set(entry["stem"]["stem_normalization"]["weights"]) == {"mean", "variance"}
    assert {e["layer"] for e in groups["transpose"]["activations"]} == {"depthwise", "relu"}
    assert [e["layer"] for e in groups["hidden"]["activations"]] == ["hidden"]


def test_l1_and_apoz_importances_against_numpy(small):
    network, groups = small
    groups = list(groups.values())
    l1 = channel_importance.importance_scores("l1", network, groups)
    assert set(l1) == {"hidden", "separable", "side", "stem", "transpose"}  # frozen groups get none
    kernel = {layer.name: np.abs(layer.get_weights()[0 if layer.name != "separable" else 1]).astype(np.float64)
              for layer in network.layers if layer.weights}

    def equal_say(*norms):  # several producers (tied through an Add): each divided by its mean, then averaged
        return np.mean([norm / norm.mean() for norm in norms], axis=0)

    np.testing.assert_allclose(l1["transpose"], equal_say(kernel["transpose"].sum(axis=(0, 1, 3)), kernel["trunk"][..., :4].sum(axis=(0, 1, 2))))
    np.testing.assert_allclose(l1["side"], equal_say(kernel["side"].sum(axis=(0, 1, 2)), kernel["trunk"][..., 4:].sum(axis=(0, 1, 2))))
    np.testing.assert_allclose(l1["separable"], kernel["separable"].sum(axis=(0, 1, 2)))  # the pointwise kernel
    np.testing.assert_allclose(l1["hidden"], kernel["hidden"].sum(axis=0))

    images = random_images(network, count=12, seed=5)
    scores = channel_importance.importance_scores("apoz", network, groups, images, batch_size=5)  # a partial last batch
    assert set(scores) == {"hidden", "side", "transpose"}  # groups with a ReLU-family output
    # per-layer APoZ is checked against numpy once (test_prune.py); here: how traced groups combine their layers'
    zeros = channel_importance.apoz(network, ["relu", "depthwise", "hidden"], images, batch_size=12, verbose=0)
    np.testing.assert_allclose(1 - scores["transpose"], (zeros["relu"][:4] + zeros["depthwise"]) / 2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(1 - scores["side"], zeros["relu"][4:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(1 - scores["hidden"], zeros["hidden"], rtol=0, atol=1e-12)
    assert 0 < zeros["relu"].mean() < 1
    with pytest.raises(ValueError, match="unknown importance"):
        channel_importance.importance_scores("l2", network, groups)


def residual_classifier(softmax, head="dense"):
    """conv a (BN, ReLU) -> conv b (BN) + shortcut conv (BN) -> Add -> ReLU -> pooled -> 4 classes,
    with BatchNorms perturbed so that channels differ. With `softmax`, the probabilities come from
    `head`: "dense" (Dense(activation="softmax")), "activation" (Activation("softmax")) or
    "layer" (Softmax()); the weights are the same for one seed whatever the spelling."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.ReLU(name="a_relu")(layers.BatchNormalization(name="a_bn")(layers.Conv2D(6, 3, padding="same", name="a")(inputs)))
    branch = layers.BatchNormalization(name="b_bn")(layers.Conv2D(5, 3, padding="same", name="b")(x))
    shortcut = layers.BatchNormalization(name="shortcut_bn")(layers.Conv2D(5, 1, name="shortcut")(x))
    x = layers.ReLU(name="out")(layers.Add(name="add")([branch, shortcut]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if softmax and head == "dense":
        outputs = layers.Dense(4, activation="softmax", name="classes")(x)
    else:
        outputs = layers.Dense(4, name="classes")(x)
        if softmax:
            outputs = (layers.Activation("softmax", name="probabilities") if head == "activation"
                       else layers.Softmax(name="probabilities"))(outputs)
    network = keras.Model(inputs, outputs)
    rng = np.random.default_rng(9)
    for layer in network.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(-1.5, 1.5, gamma.shape), rng.uniform(-0.5, 0.3, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.8, 1.2, variance.shape)])
    return network


@pytest.mark.parametrize("softmax", [True, False], ids=["probabilities", "logits"])
def test_taylor_and_bn_scale_on_traced_groups_against_numpy(softmax):
    keras.utils.set_random_seed(0)
    network = residual_classifier(softmax)
    groups = prune.any_model_groups(network, residual=True)
    # named after their ReLU: a's own, the residual stream's after the Add
    assert [(group["name"], prune.is_residual(group)) for group in groups] == [("a_relu", False), ("out", True)]
    assert [group["name"] for group in prune.any_model_groups(network)] == ["a_relu"]
    assert [group["name"] for group in prune.any_model_groups(network, True, ignored_layers=["shortcut_bn"])] == ["a_relu"]
    with pytest.raises(ValueError, match="has no layer conv1_conv"):
        prune.any_model_groups(network, ignored_layers=["conv1_conv"])
    images = random_images(network, count=10, seed=3)
    labels = np.arange(10) % 4
    scores = channel_importance.importance_scores("taylor", network, groups, images, labels, batch_size=4)
    features = keras.Model(network.input, [network.get_layer("a_relu").output, network.get_layer("out").output, network.output])
    with tf.GradientTape() as tape:
        a, out, output = features(images, training=False)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax, reduction="sum")(labels, output)
    gradient_a, gradient_out = tape.gradient(loss, [a, out])
    for name, activation, gradient in (("a_relu", a, gradient_a), ("out", out, gradient_out)):
        reference = np.mean(np.abs(np.sum(activation.numpy().astype(np.float64) * gradient.numpy(), axis=(1, 2))), axis=0)
        assert reference.max() > 0
        np.testing.assert_allclose(scores[name], reference, rtol=1e-3, atol=1e-5 * reference.max(), err_msg=name)

    bn_scale = channel_importance.importance_scores("bn_scale", network, groups)
    gamma = {name: np.abs(network.get_layer(f"{name}_bn").gamma.numpy().astype(np.float64)) for name in ("a", "b", "shortcut")}
    np.testing.assert_allclose(bn_scale["a_relu"], gamma["a"])
    np.testing.assert_allclose(bn_scale["out"], (gamma["b"] / gamma["b"].mean() + gamma["shortcut"] / gamma["shortcut"].mean()) / 2)
    random = channel_importance.importance_scores("random", network, groups, seed=(0, 1))
    assert {name: len(values) for name, values in random.items()} == {"a_relu": 6, "out": 5}


def test_every_softmax_spelling_gives_the_same_taylor_scores_and_loss():
    """Dense(activation="softmax"), Dense + Activation("softmax") and Dense + Softmax() are one
    function: the Taylor scores (through the logits) and the fine-tuning loss's from_logits agree."""
    images = random_images(residual_classifier(False), count=10, seed=3)
    labels = np.arange(10) % 4
    scores, networks = {}, {}
    for head in ("dense", "activation", "layer"):
        keras.utils.set_random_seed(0)
        network = networks[head] = residual_classifier(True, head)
        groups = prune.any_model_groups(network, residual=True)
        scores[head] = channel_importance.importance_scores("taylor", network, groups, images, labels, batch_size=4)
    np.testing.assert_allclose(networks["layer"].predict(images, verbose=0), networks["dense"].predict(images, verbose=0),
                               rtol=1e-5, atol=1e-7)  # the same function, the same weights
    for head in ("activation", "layer"):
        assert scores[head].keys() == scores["dense"].keys() == {"a_relu", "out"}
        for name in scores["dense"]:
            np.testing.assert_allclose(scores[head][name], scores["dense"][name], rtol=1e-4, atol=1e-7, err_msg=(head, name))
    for head, network in networks.items():
        assert channel_importance.ends_in_softmax(network) and not pruning_iteration.from_logits(network), head
    keras.utils.set_random_seed(0)
    logits = residual_classifier(False)
    assert not channel_importance.ends_in_softmax(logits) and pruning_iteration.from_logits(logits)
    # a softmax over another axis than the classes' is not the classifier's softmax
    inputs = keras.Input((3, 4))
    across = keras.Model(inputs, keras.layers.Softmax(axis=1)(keras.layers.Dense(4)(inputs)))
    assert not channel_importance.ends_in_softmax(across)


# ---------------------------------------------------------------------------------------------
# Frozen channels


def test_channels_through_a_lambda_or_a_reshape_are_frozen_not_pruned():
    layers = keras.layers
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = layers.BatchNormalization(name="a_bn")(x)
    x = layers.ReLU(name="a_relu")(x)
    x = layers.Lambda(lambda tensor: tensor * 2.0, name="double")(x)
    x = layers.Conv2D(5, 3, name="b")(x)
    x = layers.ReLU(name="b_relu")(x)
    x = layers.Conv2D(3, 1, name="c")(x)
    x = layers.Reshape((6, 18), name="fold")(x)  # 6 x 6 x 3 -> 6 x 18: the channel axis changes
    outputs = layers.Dense(2, activation="softmax", name="logits")(layers.Flatten(name="flatten")(x))
    network = keras.Model(inputs, outputs)
    groups = channel_graph.trace_channel_groups(network)
    frozen = channel_graph.frozen_groups(groups)
    assert frozen == {
        "image": ["model input image"],
        "a": ["read by double (Lambda): layer type unknown to the trace"],
        "double": ["made by double (Lambda): layer type unknown to the trace"],
        "c": ["read by fold (Reshape): it changes the channel axis"],
        "fold": ["made by fold (Reshape): it changes the channel axis"],
        "logits": ["made by logits (Dense): activation 'softmax' mixes channels", "model output"],
    }
    assert [group["name"] for group in channel_graph.prunable_groups(groups)] == ["b"]
    for name in ("a", "c", "logits"):
        with pytest.raises(ValueError, match=f"{name} is frozen"):
            prune.prune_groups(network, groups, {name: [0]})
    # the rest still prunes, the Lambda carried over as it is
    pruned = prune_dead_channels_unchanged(network, groups, "b", dead=[1, 3], keep=[0, 2, 4])
    assert pruned.get_layer("b").get_config()["filters"] == 3 and pruned.get_layer("c").kernel.shape == (1, 1, 3, 3)


def test_ops_on_a_per_channel_constant_freeze_their_channels_ops_on_a_scalar_do_not():
    """`x + array` / `x * tensor` with one value per channel: the surgery cannot slice the constant,
    so those channels are frozen; hard swish's scalars and a constant broadcast over the channels
    pass. keras.ops.reshape is an op, not the Reshape layer: frozen (once a crash)."""
    layers = keras.layers
    inputs = keras.Input((6, 6, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = layers.ReLU(name="a_relu")(x + np.array([0.5, -1.0, 2.0, 0.25], "float32"))
    x = layers.Conv2D(5, 3, padding="same", name="b")(x)
    x = x * layers.ReLU(6.0, name="gate")(x + 3.0) / 6.0  # hard swish, divided as some implementations do
    x = x * np.linspace(0.5, 1.5, 36, dtype="float32").reshape(6, 6, 1)  # per position, the same for every channel
    x = layers.Conv2D(6, 1, name="c")(layers.ReLU(name="b_relu")(x))
    x = keras.ops.multiply(x, keras.ops.convert_to_tensor(np.linspace(1, 2, 6, dtype="float32")))
    x = keras.ops.reshape(layers.GlobalAveragePooling2D(name="pool")(x), (-1, 6))
    network = keras.Model(inputs, layers.Dense(3, name="classes")(x))
    groups = channel_graph.trace_channel_groups(network)
    frozen = channel_graph.frozen_groups(groups)
    assert [group["name"] for group in channel_graph.prunable_groups(groups)] == ["b"]
    assert {"image", "a", "c", "classes"} < set(frozen)
    assert len(frozen["a"]) == 1 and re.fullmatch(
        r"read by \w+ \(ops\.Add\): a constant operand of shape \(4,\) varies along the channel axis", frozen["a"][0])
    assert len(frozen["c"]) == 1 and re.fullmatch(
        r"read by \w+ \(ops\.Multiply\): a constant operand of shape \(6,\) varies along the channel axis", frozen["c"][0])
    assert any(re.fullmatch(r"read by \w+ \(ops\.Reshape\): layer type unknown to the trace", reason)
               for reasons in frozen.values() for reason in reasons)
    for name in ("a", "c"):
        with pytest.raises(ValueError, match=f"{name} is frozen"):
            prune.prune_groups(network, groups, {name: [0, 1]})
    # b, through the hard swish and the per-position constant: its dead channels removed, the same outputs
    pruned = prune_dead_channels_unchanged(network, groups, "b", dead=[1, 3], keep=[0, 2, 4])
    assert pruned.get_layer("b").get_config()["filters"] == 3 and pruned.get_layer("c").kernel.shape == (1, 1, 3, 6)


# ---------------------------------------------------------------------------------------------
# Our ResNet50, pruned as any model


@pytest.mark.parametrize("stem", resnet.STEMS)
def test_our_resnet_groups_read_as_its_records_and_its_size_is_counted_exactly(stem):
    """Traced, our ResNet50's groups carry the names apoz.json and the figures have always used
    (conv1/conv2 of every block after their ReLU, a stage's residual stream), the stem left to
    --ignored_layers, the softmax frozen; size_counter equals the pruned model's count."""
    keras.utils.set_random_seed(0)
    network = resnet.build_resnet50(resnet.width_spec(0.0625), stem)
    assert set(channel_graph.frozen_groups(channel_graph.trace_channel_groups(network))) == {
        "input_layer", "predictions", "probabilities"}  # the softmax mixes channels
    groups = prune.any_model_groups(network, residual=True, ignored_layers=["conv1_conv"])
    residual = [f"{stage}_residual" for stage in resnet.STAGE_NAMES]
    assert [group["name"] for group in groups] == resnet.inner_activation_names() + residual
    assert [group["name"] for group in prune.any_model_groups(network)][0] == "conv1_relu"  # the stem, when not ignored
    stream = groups[-2]  # conv4: the shortcut and every block's conv3 write it, the next blocks' conv1 read it
    blocks = resnet.stage_block_names(2)
    assert {entry["layer"] for entry in stream["producers"]} == {"conv4_block1_0_conv"} | {f"{b}_3_conv" for b in blocks}
    assert {entry["layer"] for entry in stream["consumers"]} == ({f"{b}_1_conv" for b in blocks[1:]}
                                                                 | {"conv5_block1_1_conv", "conv5_block1_0_conv"})
    assert [entry["layer"] for entry in stream["activations"]] == [f"{b}_out" for b in blocks]
    assert prune.size_counter(network, [])({}) == (network.count_params(), resnet.count_macs(network)[1])
    rng = np.random.default_rng(8)
    keep = {group["name"]: np.sort(rng.choice(group["width"], int(rng.integers(1, group["width"] + 1)), replace=False))
            for group in groups}
    pruned = prune.prune_groups(network, groups, keep)
    widths = {name: len(indices) for name, indices in keep.items()}
    assert prune.size_counter(network, groups)(widths) == (pruned.count_params(), resnet.count_macs(pruned)[1])
    spec = resnet.describe_model(pruned)[0]  # still our ResNet50: the width spec reads the kept widths
    assert spec["stages"] == [widths[name] for name in residual] and spec["stem"] == network.get_layer("conv1_conv").filters
    assert pruned.count_params() == resnet.parameter_count(spec, stem)


def test_macs_of_a_transposed_convolution_and_of_a_layer_called_twice_by_hand():
    """A transposed convolution multiplies its kernel once per INPUT position (not per output
    position, stride^2 more); a layer called twice computes twice."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    up = layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(inputs)  # 16x16x4
    shared = layers.Conv2D(5, 1, name="shared")
    big = layers.GlobalAveragePooling2D()(shared(up))  # on 16x16 positions
    small = layers.GlobalAveragePooling2D()(shared(layers.MaxPooling2D(name="pool")(up)))  # on 8x8 positions
    network = keras.Model(inputs, layers.Dense(2, name="classes")(layers.Concatenate()([big, small])))
    up_macs = 8 * 8 * (3 * 3 * 3 * 4)  # input positions x kernel elements
    shared_macs = (16 * 16 + 8 * 8) * (4 * 5)
    dense_macs = 10 * 2
    sequential = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2DTranspose(4, 3, strides=2, padding="same"),
                                   layers.Flatten(), layers.Dense(2)])
    assert prune.model_size(sequential) == (sequential.count_params(), up_macs + 16 * 16 * 4 * 2)
    assert prune.model_size(network) == (network.count_params(), up_macs + shared_macs + dense_macs)
    groups = prune.any_model_groups(network)
    assert [group["name"] for group in groups] == ["up", "shared"]
    # "up" cut to 2 channels: its kernel and the shared 1x1 kernel's input axis halve
    assert prune.size_counter(network, groups)({"up": 2})[1] == 8 * 8 * (3 * 3 * 3 * 2) + (16 * 16 + 8 * 8) * (2 * 5) + dense_macs


def test_surgery_of_a_layer_called_twice_computes_the_original_on_the_kept_channels():
    """A 1x1 convolution `shared` called on two producers' outputs (`up`, 16x16, and `other`, 8x8):
    one kernel reads both, so their channels form one group, and pruning that group and `shared`'s
    own outputs slices the one kernel once; the Dense after the concatenation of both calls' pooled
    outputs loses the rows of both copies. The pruned model against numpy on the original weights
    restricted to the kept channels."""
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    up = layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(inputs)
    other = layers.Conv2D(4, 3, padding="same", name="other")(inputs)
    shared = layers.Conv2D(5, 1, name="shared")
    big = layers.GlobalAveragePooling2D()(shared(up))
    small = layers.GlobalAveragePooling2D()(shared(other))
    network = keras.Model(inputs, layers.Dense(2, name="classes")(layers.Concatenate()([big, small])))
    for layer in network.layers:  # non-zero biases, so a bias left unsliced would show
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, np.random.default_rng(1).normal(0, 0.5, bias.shape).astype("float32")])
    groups = prune.any_model_groups(network, residual=True)  # two producers tied: pruned like a residual stream, listed last
    assert [(group["name"], group["width"], sorted(entry["layer"] for entry in group["producers"])) for group in groups] == [
        ("shared", 5, ["shared"]), ("up", 4, ["other", "up"])]
    keep_in, keep_out = [0, 2, 3], [1, 4]
    pruned = prune.prune_groups(network, groups, {"up": keep_in, "shared": keep_out})
    assert pruned.get_layer("up").filters == pruned.get_layer("other").filters == 3
    assert pruned.get_layer("shared").filters == 2

    images = random_images(network, count=3, seed=2)
    up_kept, other_kept = (outputs_of(keras.Model(network.input, network.get_layer(name).output), images)[..., keep_in]
                           .astype(np.float64) for name in ("up", "other"))
    kernel, bias = (weight.astype(np.float64) for weight in network.get_layer("shared").get_weights())
    kernel, bias = kernel[0, 0][keep_in][:, keep_out], bias[keep_out]  # (in, out) of the 1x1 kernel

    def shared_then_mean(x):
        return (np.einsum("nhwi,io->nhwo", x, kernel) + bias).mean(axis=(1, 2))

    dense_kernel, dense_bias = (weight.astype(np.float64) for weight in network.get_layer("classes").get_weights())
    rows = keep_out + [5 + channel for channel in keep_out]  # both calls' copies in the concatenation
    expected = np.concatenate([shared_then_mean(up_kept), shared_then_mean(other_kept)], axis=1) @ dense_kernel[rows] + dense_bias
    np.testing.assert_allclose(outputs_of(pruned, images), expected, rtol=1e-5, atol=1e-5)
