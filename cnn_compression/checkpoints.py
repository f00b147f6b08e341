"""Model files: saving and opening our `.h5` checkpoints, and loading pretrained weights by name."""

import os
import weakref

from cnn_compression.cli import UserError
from cnn_compression.files import write_atomically

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # Keras 3's native .keras archive
KERAS_SUFFIX = ".keras"


def _output_layer_names(model):
    return {tensor._keras_history.operation.name for tensor in model.outputs}


def recast(model, dtype):
    """A copy of functional `model` whose layers compute in `dtype` (a dtype policy name), same weights.

    float32 for saving a model trained in mixed precision (no mixed policy reaches an `.h5`); a
    mixed policy to train or run a loaded float32 model fast. Returns `model` itself when nothing changes.
    """
    import keras

    if all(layer.dtype_policy.name == dtype for layer in model.layers
           if not isinstance(layer, keras.layers.InputLayer) and layer.name not in _output_layer_names(model)):
        return model

    outputs = _output_layer_names(model)

    def clone(layer):
        # Under a mixed policy the output layers stay float32 (as build_resnet50 makes its softmax).
        layer_dtype = "float32" if dtype.startswith("mixed") and layer.name in outputs else dtype
        return layer.__class__.from_config({**layer.get_config(), "dtype": layer_dtype})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def working_copy(model, strategy):
    """A copy of `model` to train: its variables created under `strategy` (replicated), its layers
    computing in the global precision policy (output layers float32, see `recast`), same weights.
    Saved models are float32 (`save_model`): this is where a stage puts them back in the policy."""
    import keras

    with strategy.scope():
        copy = recast(model, keras.mixed_precision.global_policy().name)
        if copy is model:  # already in the policy: still a copy built under the strategy
            copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


_FLOAT32_COPIES = weakref.WeakKeyDictionary()  # mixed-precision model -> its float32 clone, for saving


def float32_copy(model):
    """`model` itself when it computes in float32, else its float32 clone (`recast`) holding its
    current weights. A stage saves the same model every improved epoch: the clone is built once
    per model object (about a second for a ResNet50) and only its weights are refreshed."""
    copy = _FLOAT32_COPIES.get(model)
    if copy is None:
        copy = recast(model, "float32")
        if copy is not model:
            _FLOAT32_COPIES[model] = copy
        return copy
    copy.set_weights(model.get_weights())
    return copy


_H5_HOLDS = weakref.WeakKeyDictionary()  # model -> why .h5 cannot hold it ('' when it can), tried once per model
_NOTED = set()  # (model name, why .h5 cannot hold it) already said: a run saves many such models


def keras_path(path):
    """The native `.keras` file written beside the `.h5` at `path` (model.h5 -> model.keras)."""
    return os.path.splitext(path)[0] + KERAS_SUFFIX


def remove_model(path):
    """Delete the model file at `path` and the `.keras` that `save_model` may have written beside it."""
    for written in (path, keras_path(path)):
        if os.path.exists(written):
            os.remove(written)


def _only_keras_layers(model):
    """Every operation of `model` is a layer class Keras exports (what the `.h5` reader rebuilds by
    name); false for custom classes and for ops called on tensors while building the graph."""
    import keras

    return all(getattr(keras.layers, type(operation).__name__, None) is type(operation)
               for operation in getattr(model, "operations", model.layers))


def _h5_failure(model, path):
    """Why the `.h5` just written at `path` does not reopen as `model` ('' when it does). Some
    keras.applications models cannot: unregistered custom layer classes (ConvNeXt's LayerScale),
    graph nodes calling ops on Python constants (MobileNetV3's hard sigmoid). A model of exported
    layer classes only needs no trial; others are reopened once per model object (a stage saves
    the same model every improved epoch)."""
    import keras

    if _only_keras_layers(model):
        return ""
    if model in _H5_HOLDS:
        return _H5_HOLDS[model]
    try:
        keras.models.load_model(path, compile=False)
        failure = ""
    except Exception as error:  # any reason Keras gives is a reason not to rely on the .h5 alone
        failure = (str(error).splitlines()[0] if str(error) else type(error).__name__)[:200]
    _H5_HOLDS[model] = failure
    return failure


def save_model(model, path):
    """Save `model` as a float32 Keras HDF5 (no optimizer state: every stage compiles afresh) atomically;
    the model's own compile settings stay untouched. Where `.h5` cannot hold the model (it does not
    reopen, see `_h5_failure`), the native `.keras` is written beside it too (`keras_path`), said
    on stdout once per process for a model name and reason (a pruning run saves a new model object
    twice an iteration, each as unfit as the last); `load_model` opens it when the `.h5` fails.
    Returns the paths written.

    (Keras 3 strips the optimizer from the compile config of the model it saves to .h5.)
    """
    float32 = float32_copy(model)
    compile_config = getattr(float32, "_compile_config", None)
    saved = dict(compile_config.config) if compile_config is not None else None
    write_atomically(path, lambda temporary: float32.save(temporary, include_optimizer=False))
    written = [path]
    if path.endswith((".h5", ".hdf5")):
        failure = _h5_failure(model, path)
        if failure:
            other = keras_path(path)
            write_atomically(other, lambda temporary: float32.save(temporary, include_optimizer=False))
            written.append(other)
            if (model.name, failure) not in _NOTED:
                _NOTED.add((model.name, failure))
                print(f"note: {os.path.basename(path)} cannot hold {model.name} ({failure}); "
                      f"also writing {os.path.basename(other)}, and from now on a .keras beside each .h5 of this "
                      "model, which every stage opens in its place")
    if saved is not None:
        compile_config.config = saved
    return written


def load_model(path, what="model", check=None):
    """Open a Keras model file with plain Keras: an `.h5` (HDF5), or a native `.keras` archive for
    models `.h5` cannot hold (see `save_model`). A missing, foreign or broken file is a UserError.
    `check(model)`, if given, may refuse the model with a UserError (e.g. `model.describe_model`
    for a stage that needs our ResNet50)."""
    import keras

    if not os.path.exists(path):
        raise UserError(f"no {what} at {path}")
    if os.path.isdir(path):
        raise UserError(f"{what} path {path} is a folder, not an .h5 or .keras file")
    with open(path, "rb") as handle:
        signature = handle.read(8)
    if signature.startswith(ZIP_SIGNATURE):
        if not path.endswith(KERAS_SUFFIX):  # Keras picks its reader by the suffix
            raise UserError(f"{path} is a Keras archive: name it with the .keras suffix")
    elif signature != HDF5_SIGNATURE:
        raise UserError(f"{path} is not an HDF5 (.h5) file or a Keras archive (.keras)")
    try:
        loaded = keras.models.load_model(path, compile=False)
    except Exception as error:  # h5py and Keras raise many kinds for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        beside = keras_path(path)
        if signature != HDF5_SIGNATURE or not os.path.isfile(beside):
            raise UserError(f"cannot open {path} as a Keras model: {reason[:200]}") from None
        # A model .h5 cannot hold: save_model wrote the native archive beside it.
        return load_model(beside, what, check)
    damaged = non_finite_weight(loaded)
    if damaged:  # a diverged or damaged file: every measurement of it would be chance
        raise UserError(f"{path} holds non-finite weights (NaN or infinity) in {damaged}: not a usable {what}")
    if check is not None:
        try:
            check(loaded)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
    return loaded


def non_finite_weight(model):
    """The path of the first of `model`'s weights holding a NaN or an infinity, or None."""
    import keras
    import numpy as np

    for weight in model.weights:
        if not np.isfinite(keras.ops.convert_to_numpy(weight)).all():
            return weight.path
    return None


def _keras2_layer_weights(archive):
    """{layer name: [arrays]} of a Keras 2 / legacy HDF5 file (a whole model or `save_weights` .h5)."""
    import numpy as np

    group = archive["model_weights"] if "model_weights" in archive else archive
    layers = {}
    for raw_name in group.attrs["layer_names"]:
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        layer_group = group[name]
        weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in layer_group.attrs.get("weight_names", [])]
        layers[name] = [np.asarray(layer_group[w]) for w in weight_names]
    return layers


def _keras3_layer_weights(archive, model):
    """{layer name of `model`: [arrays]} of a Keras 3 `.weights.h5` file.

    Keras 3 files name a functional model's layers not by their names but by class and position
    ("conv2d", "conv2d_1", ... over `model.layers` in order); the same rule on `model` maps them
    back, so a file saved from any model with our layer order (ours, keras.applications' ResNet50)
    loads by position within each layer class.
    """
    import numpy as np
    from keras.src.utils.naming import to_snake_case

    stored = archive["layers"]
    used, layers = {}, {}
    for layer in model.layers:
        key = to_snake_case(type(layer).__name__)
        used[key] = used.get(key, -1) + 1
        if used[key]:
            key = f"{key}_{used[key]}"
        if key in stored and "vars" in stored[key]:
            variables = stored[key]["vars"]
            layers[layer.name] = [np.asarray(variables[str(index)]) for index in range(len(variables))]
    return layers


def load_weights_by_name(model, path):
    """Copy weights from a Keras HDF5 file into `model`, layer by layer.

    Takes a whole-model `.h5`, a Keras 2 weights `.h5` (both matched by layer name) and a Keras 3
    `.weights.h5` (matched by layer class and position, see `_keras3_layer_weights`). Layers whose
    weight shapes differ (such as a 1000-class ImageNet head) are skipped.
    Returns (layers loaded, names of layers skipped for shape).
    """
    import h5py

    if not os.path.isfile(path):
        raise UserError(f"no pretrained model at {path}")
    with open(path, "rb") as handle:
        if handle.read(8) != HDF5_SIGNATURE:
            raise UserError(f"{path} is not an HDF5 (.h5) file")
    try:
        with h5py.File(path, "r") as archive:
            group = archive["model_weights"] if "model_weights" in archive else archive
            if "layer_names" in group.attrs:
                stored = _keras2_layer_weights(archive)
            elif "layers" in archive:
                stored = _keras3_layer_weights(archive, model)
            else:
                raise UserError(f"{path} holds no Keras layer weights (neither a Keras 2 .h5 nor a Keras 3 .weights.h5)")
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"cannot read weights from {path}: {error}") from None
    loaded, skipped = 0, []
    for layer in model.layers:
        values = stored.get(layer.name)
        if not values:
            continue
        if [v.shape for v in values] != [tuple(w.shape) for w in layer.weights]:
            skipped.append(layer.name)
            continue
        layer.set_weights(values)
        loaded += 1
    if loaded == 0:
        raise UserError(f"{path} shares no layer name and shape with a ResNet50 of this project")
    return loaded, skipped
