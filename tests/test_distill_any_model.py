"""Distillation beyond our ResNet50: keras.applications teachers (MobileNetV2 with its own narrowed
student, a DenseNet with a hand-made CNN student), hint pairs, the stage script on any classifier,
and models only the native .keras format holds."""

import json

import keras
import numpy as np
import pytest

import distillation
import knowledge_distillation
import prune
import students
from cnn_compression import checkpoints
from cnn_compression import data
from cnn_compression import training
from conftest import assert_one_line_error, run_in_process
from test_prune_any_model import small_classifier

@pytest.fixture(scope="module")
def batch():
    x_train, y_train, _, _ = data.load_sample()
    return x_train[:8].astype("float32"), np.eye(10, dtype="float32")[y_train[:8].ravel()]


def terms_fall(student, teacher, images, labels, **options):
    """{term: (before, after)} for each loss term trained alone for one step on `images` (a
    Distiller of that lambda alone): a plain gradient step on the very function measured, so each
    term must fall; in the step all three together, one term may rise while the sum falls."""
    found = {}
    for term, lambdas in zip(distillation.LOSS_TERMS, ((1, 0, 0), (0, 1, 0), (0, 0, 1))):
        distiller = distillation.Distiller(student, teacher, lambdas, **options)
        # the discriminator frozen (rate 0): the generator term has a fixed target; eager, as
        # tracing train_step costs more than one step saves
        distiller.compile(optimizer=keras.optimizers.SGD(0.01), discriminator_optimizer=keras.optimizers.SGD(0.0),
                          run_eagerly=True)
        before = distiller.train_on_batch(images, labels, return_dict=True)[term]  # measured before the update
        _, after, _ = distiller.compute_terms(images, labels, training=True)
        found[term] = (float(before), float(after[term]))
    return found


def assert_every_term_finite_and_falling(terms):
    assert set(terms) == set(distillation.LOSS_TERMS)
    for name, (before, after) in terms.items():
        assert np.isfinite([before, after]).all() and after < before, (name, before, after)


def group_produced_by(network, layer_name):
    """The name of the traced channel group whose channels `layer_name` produces (groups are named
    after the ReLU that shows them, so not always after the layer)."""
    return next(group["name"] for group in prune.any_model_groups(network, residual=True)
                if any(producer["layer"] == layer_name for producer in group["producers"]))


# Each loss term takes a gradient step of its own: the hint term alone never reaches the classifier
# head, so Keras warns that the head has no gradient for that step, as expected.
@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")
def test_a_mobilenet_v2_teacher_distils_into_its_own_narrowed_student(batch, tmp_path):
    images, labels = batch
    training.set_seed(0)
    teacher = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    student, widths, achieved = students.narrowed_student(teacher, 4.0)
    # Its own family: the same layers, every channel group narrowed, the classes kept; the size
    # counted from the groups is the built model's.
    assert [layer.name for layer in student.layers] == [layer.name for layer in teacher.layers]
    assert teacher.count_params() / student.count_params() == pytest.approx(achieved, rel=1e-9)
    assert 4.0 <= achieved <= 4.0 / (1 - students.COMPRESSION_TOLERANCE)
    stem = group_produced_by(teacher, "Conv1")
    assert student.get_layer("Conv1").filters == widths[stem] < teacher.get_layer("Conv1").filters
    assert student.output_shape == (None, 10)
    # Fresh weights, not the teacher's first channels
    kept = teacher.get_layer("Conv1").get_weights()[0][..., :widths[stem]]
    assert not np.allclose(student.get_layer("Conv1").get_weights()[0], kept)

    hints = [("block_5_add", "block_5_add"), ("out_relu", "out_relu")]
    distiller = distillation.Distiller(student, teacher, (0.7, 0.3, 0.2), hint_layers=hints)
    assert [(r.student_channels, r.teacher_channels) for r in distiller.regressors] == [
        (widths_of(student, name), widths_of(teacher, name)) for name, _ in hints]
    assert_every_term_finite_and_falling(terms_fall(student, teacher, images, labels, hint_layers=hints))
    checkpoints.save_model(student, str(tmp_path / "student.h5"))
    reopened = keras.models.load_model(str(tmp_path / "student.h5"))  # plain Keras
    np.testing.assert_allclose(reopened(images[:2]), student(images[:2]), rtol=1e-4, atol=1e-5)


def widths_of(network, layer_name):
    return network.get_layer(layer_name).output.shape[-1]


def small_densenet():
    """keras.applications' DenseNet builder with two layers per dense block (DenseNet121 has
    6/12/24/16): the same family and layer names, a fraction of the build and step time."""
    from keras.src.applications.densenet import DenseNet

    return DenseNet([2, 2, 2, 2], weights=None, input_shape=(32, 32, 3), classes=10, name="densenet_small")


def hand_made_student():
    """A CNN of a few layers giving logits, with an 8x8 map to hint (the dense block 1's size)."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="reduce")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="features")(x)
    outputs = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="hand_made")


# Each loss term takes a gradient step of its own: the hint term alone never reaches the classifier
# head, so Keras warns that the head has no gradient for that step, as expected.
@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")
def test_a_densenet_teacher_distils_into_a_hand_made_cnn_and_bad_pairs_are_refused(batch, tmp_path):
    images, labels = batch
    training.set_seed(0)
    teacher, student = small_densenet(), hand_made_student()
    pair = ("conv2_block2_concat", "features")  # 8x8 maps, 128 and 16 channels
    distiller = distillation.Distiller(student, teacher, (0.7, 0.3, 0.2), "vid", hint_layers=[pair])
    assert distiller.teacher_probabilities and not distiller.student_probabilities  # a softmax head, logits
    assert [(r.student_channels, r.teacher_channels) for r in distiller.regressors] == [(16, 128)]
    assert_every_term_finite_and_falling(terms_fall(student, teacher, images, labels, regressor_name="vid",
                                                    hint_layers=[pair]))
    with pytest.raises(ValueError, match=r"pairs a 4x4 teacher map with a 8x8 student map: the spatial sizes must match"):
        distillation.hint_pairs(teacher, student, [("conv3_block2_concat", "features")])
    with pytest.raises(ValueError, match="has no layer conv9"):
        distillation.hint_pairs(teacher, student, [("conv9", "features")])
    with pytest.raises(ValueError, match="outputs \\(None, 10\\): a hint needs a"):
        distillation.hint_pairs(teacher, student, [("conv2_block2_concat", "logits")])
    with pytest.raises(ValueError, match="stage outputs, the default hints"):  # no ResNet50: pairs must be named
        distillation.Distiller(student, teacher, (0.7, 0.3, 0.0))
    checkpoints.save_model(student, str(tmp_path / "student.h5"))
    keras.models.load_model(str(tmp_path / "student.h5"))  # plain Keras


# ---------------------------------------------------------------------------------------------
# The stage script


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifiers")
    keras.utils.set_random_seed(0)
    small_classifier(softmax=True).save(str(folder / "teacher.keras"))  # the native format is taken too
    small_classifier(classes=5).save(str(folder / "five.h5"))
    small_classifier().save(str(folder / "student.h5"))
    small_classifier().save(str(folder / "archive.keras"))
    (folder / "archive.keras").rename(folder / "archive.h5")
    return folder


def test_the_script_distils_any_teacher_into_its_narrowed_student(classifiers, tmp_path, data_flags, capsys):
    save = tmp_path / "kd"
    knowledge_distillation.main([str(argument) for argument in [
        "--teacher_path", classifiers / "teacher.keras", "--student_compression", 2, "--hint_layers", "block_out:block_out",
        "--save_folder", save, *data_flags, "--train_size", 100, "--batch_size", 50, "--epoch_num", 1, "--verbose", 0,
        "--precision", "float32"]])
    assert ("loss 0.7 * backbone_loss + 0.3 * intermediate_loss + 0.2 * adversarial_loss (its discriminator trained "
            "alongside); hints block_out:block_out;") in capsys.readouterr().out
    student = keras.models.load_model(str(save / "model.h5"))  # plain Keras
    teacher = keras.models.load_model(str(classifiers / "teacher.keras"))
    assert [layer.name for layer in student.layers] == [layer.name for layer in teacher.layers]
    config = json.loads((save / "config.json").read_text())
    results = config["results"]
    assert config["complete"] and results["parameters"] == student.count_params()
    assert 2 <= results["compression_vs_teacher"] <= 2 / (1 - students.COMPRESSION_TOLERANCE)
    names = {layer: group_produced_by(teacher, layer) for layer in ("stem", "inner", "wide")}
    assert set(results["student_widths"]) == set(names.values())  # the residual stream narrowed too
    assert student.get_layer("inner").filters == results["student_widths"][names["inner"]] < 12
    history = json.loads((save / "history.json").read_text())
    assert {f"train_{name}" for name in distillation.LOSS_TERMS} <= set(history)
    assert all(np.isfinite(history[f"train_{name}"]).all() for name in distillation.LOSS_TERMS)


def test_a_student_as_large_as_its_teacher_is_trained_with_a_note(classifiers, tmp_path, data_flags):
    """Born-again distillation (a student the teacher's size) is a use of its own, so it runs; the
    note says it compresses nothing, where the log would otherwise read "1.00x smaller". With
    --lambda2 0 --lambda3 0 the run has only the backbone term; --teacher_batch_norm fold folds
    the teacher's BatchNorms."""
    save = tmp_path / "kd"
    completed = run_in_process("knowledge_distillation.py", "--teacher_path", classifiers / "teacher.keras",
                               "--student_path", classifiers / "student.h5", "--lambda2", 0, "--lambda3", 0,
                               "--teacher_batch_norm", "fold", "--save_folder", save, *data_flags, "--train_size", 100,
                               "--batch_size", 50, "--epoch_num", 1, "--verbose", 0, "--precision", "float32")
    parameters = keras.models.load_model(str(classifiers / "student.h5")).count_params()
    assert (f"note: the student ({parameters:,} parameters) is not smaller than its teacher ({parameters:,}): "
            "this run compresses nothing") in completed.stderr
    assert json.loads((save / "config.json").read_text())["results"]["compression_vs_teacher"] == 1.0
    # Only the terms with a weight are computed, logged and recorded: no hints, no discriminator.
    # its three convolution + BatchNorm pairs folded for the run (batch_norm_folding)
    assert "; loss 0.7 * backbone_loss; 3 teacher BatchNorms folded; starting in" in completed.stdout
    assert set(json.loads((save / "history.json").read_text())) == set(training.HISTORY_KEYS) | {
        "train_cross_entropy", "train_backbone_loss"}


def test_a_narrowed_student_rounded_to_8_has_every_width_a_multiple_of_8_where_the_teacher_allows():
    """MobileNetV2's groups narrowed 4x with --student_round_to 8: each width a multiple of 8 (or the
    teacher's own width where that is below 8), the compression still within 3% past the target,
    and the same groups as the unrounded student."""
    teacher = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    groups = prune.any_model_groups(teacher, residual=True)
    plain, _ = students.narrowed_widths(teacher, groups, 4.0)
    rounded, achieved = students.narrowed_widths(teacher, groups, 4.0, round_to=8)
    assert set(rounded) == set(plain) and rounded != plain
    teacher_widths = {group["name"]: group["width"] for group in groups}
    assert all(width % 8 == 0 or width == teacher_widths[name] < 8 for name, width in rounded.items()), rounded
    assert all(width <= teacher_widths[name] for name, width in rounded.items())
    assert 4.0 <= achieved <= 4.0 / (1 - students.COMPRESSION_TOLERANCE)


@pytest.mark.parametrize("case, flags, expected", [
    ("five classes", ["--teacher_path", "five.h5", "--student_compression", 2], "outputs (None, 5): the distillation stage needs"),
    ("hint sizes", ["--teacher_path", "teacher.keras", "--student_path", "student.h5", "--hint_layers", "stem_relu:wide"],
     "pairs a 16x16 teacher map with a 8x8 student map"),
    ("no student", ["--teacher_path", "teacher.keras", "--lambda2", 0], "pass --student_compression R"),
    ("no pairs", ["--teacher_path", "teacher.keras", "--student_compression", 2], "name the teacher:student layer pairs"),
    ("reinitialise", ["--teacher_path", "teacher.keras", "--student_compression", 2, "--reinitialise_student"],
     "re-initialises --student_path"),
    ("bad pair", ["--teacher_path", "teacher.keras", "--hint_layers", "block_out"], "not a teacher_layer:student_layer pair"),
    ("hints off", ["--teacher_path", "teacher.keras", "--student_compression", 2, "--hint_layers", "block_out:block_out",
                   "--lambda2", 0], "--lambda2 0 switches off"),
    ("archive named .h5", ["--teacher_path", "archive.h5", "--student_compression", 2], "name it with the .keras suffix"),
    ("rounding nothing", ["--teacher_path", "teacher.keras", "--student_path", "student.h5", "--student_round_to", 8],
     "--student_round_to rounds the widths --student_compression chooses"),
])
def test_bad_teachers_students_and_pairs_are_refused_in_one_line_before_anything_is_written(case, flags, expected,
                                                                                         classifiers, tmp_path):
    flags = [classifiers / flag if str(flag).endswith((".h5", ".keras")) else flag for flag in flags]
    save = tmp_path / "kd"
    line = assert_one_line_error(run_in_process("knowledge_distillation.py", *flags, "--save_folder", save,
                                                "--dataset", "sample", check=False))
    assert expected in line, case
    assert not save.exists()


# ---------------------------------------------------------------------------------------------
# Models an .h5 cannot hold


def test_a_model_h5_cannot_hold_is_written_as_keras_beside_it_and_opened_from_there(tmp_path, capsys):
    inputs = keras.Input((4,))
    network = keras.Model(inputs, keras.layers.Dense(3)(inputs + 3.0), name="with_constant")  # an op node on 3.0
    written = checkpoints.save_model(network, str(tmp_path / "model.h5"))
    assert written == [str(tmp_path / "model.h5"), str(tmp_path / "model.keras")]
    assert "also writing model.keras" in capsys.readouterr().out
    with pytest.raises(Exception):
        keras.models.load_model(str(tmp_path / "model.h5"))  # why the .keras is needed
    values = np.arange(8, dtype="float32").reshape(2, 4)
    for path in ("model.h5", "model.keras"):  # every stage opens the .h5 path; the archive answers
        np.testing.assert_allclose(checkpoints.load_model(str(tmp_path / path))(values), network(values), rtol=1e-6)
    keras.models.load_model(str(tmp_path / "model.keras"))  # plain Keras
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert checkpoints.save_model(plain, str(tmp_path / "plain.h5")) == [str(tmp_path / "plain.h5")]


# ---------------------------------------------------------------------------------------------
# Fresh weights for a given student


class Scale(keras.layers.Layer):
    """A custom layer whose weight names no `<weight>_initializer` attribute."""

    def build(self, input_shape):
        self.factor = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="factor")

    def call(self, inputs):
        return inputs * self.factor


def test_reinitialised_redraws_learnt_weights_and_keeps_input_statistics():
    inputs = keras.Input((4,))
    normalization = keras.layers.Normalization(name="normalise")
    normalization.adapt(np.arange(40, dtype="float32").reshape(10, 4))
    hidden = keras.layers.Dense(8, name="hidden", bias_initializer="ones")(normalization(inputs))
    for custom in (False, True):
        outputs = keras.layers.Dense(3, name="scores")(Scale(name="scale")(hidden) if custom else hidden)
        network = keras.Model(inputs, outputs)
        for layer in network.layers:  # trained-looking weights: none is its initial value
            layer.set_weights([weight + 0.5 for weight in layer.get_weights()])
        before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in network.layers}
        fresh = students.reinitialised(network)
        assert (fresh is network) != custom  # in place, or (a custom layer) a rebuilt copy
        after = {layer.name: layer.get_weights() for layer in fresh.layers}
        np.testing.assert_array_equal(after["normalise"][0], before["normalise"][0])  # the input's statistics
        np.testing.assert_array_equal(after["hidden"][1], np.ones(8))  # the bias initializer's value
        for name in ("hidden", "scores") + (("scale",) if custom else ()):
            assert not np.allclose(after[name][0], before[name][0]), name
