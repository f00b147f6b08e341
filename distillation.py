"""Knowledge distillation from a frozen teacher into a small student: any functional classifiers.

The objective is the original project's three-part loss with its defects fixed:

    L = lambda1 * L_backbone + lambda2 * L_intermediate + lambda3 * L_adversarial

- L_backbone: (1 - beta) * CE(labels, student) + beta * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
  averaged over the batch.
- L_intermediate: the sum over hinted layer pairs (by default our ResNet50's four stage outputs) of a
  regressor's error against the teacher's layer output (MSE, or the Gaussian negative
  log-likelihood of variational information distillation).
  Trainable regressors are updated by the student's optimizer.
- L_adversarial: the non-saturating generator loss of a discriminator on logits that learns, with
  its own optimizer, to tell the teacher's logits from the student's. Its gradient reaches the student.

Every loss is a small pure function of tensors (keras.ops, so numpy arrays work too). `Distiller`
is a keras.Model whose `train_step` makes the student/regressor update and the discriminator
update, so training is plain `fit` with callbacks.
"""

import math

from cnn_compression import onednn  # noqa: F401  (before TensorFlow loads)
import keras
from keras import ops

import model as resnet

REGRESSORS = ("conv1x1", "constant", "vid")
VID_EPSILON = 1e-5  # variance floor of VID (Ahn et al. 2019; RepDistiller's value)
VID_INITIAL_VARIANCE = 5.0  # RepDistiller's init_pred_var
DISCRIMINATOR_SLOPE = 0.25  # the original's LeakyReLU(0.25)
LOSS_TERMS = ("backbone_loss", "intermediate_loss", "adversarial_loss")


# ---------------------------------------------------------------------------------------------
# Loss terms: pure functions


def _as_list(outputs):
    # A functional model with one output returns a tensor, not a one-element list.
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _float32(x):
    # Mixed precision computes the networks in bfloat16; the losses stay in float32.
    return ops.cast(x, "float32")


def head_model(network, layer_names=()):
    """(model, is_probabilities): `network` returning [its class scores, the named layers' outputs].

    The class scores are the logits before a final softmax where the graph has them (our
    ResNet50's `predictions`), else its output: probabilities when a layer computes the softmax
    inside (Dense(activation="softmax")), logits otherwise (channel_importance.classifier_head,
    the answer every stage uses). Pass such scores through `as_logits(scores, is_probabilities)`.
    """
    from cnn_compression import channel_importance

    probabilities, logits = channel_importance.classifier_head(network)
    head = logits if logits is not None else network.output
    is_probabilities = probabilities and logits is None
    outputs = [head] + [network.get_layer(name).output for name in layer_names]
    return keras.Model(network.input, outputs, name=f"{network.name}_features"), is_probabilities


def as_logits(scores, is_probabilities):
    """Logits of a head's class scores: log-probabilities for probabilities (softmax(log p) = p,
    so every loss on logits sees the same distribution), floored so that a probability rounded
    to 0 gives a finite logit."""
    if not is_probabilities:
        return scores
    tiny = 1e-30  # far below any probability that matters, far above float32's underflow
    return ops.log(ops.maximum(_float32(scores), tiny))


def cross_entropy(labels, logits, label_smoothing=0.0):
    """Per-example categorical cross-entropy of one-hot `labels` against `logits`."""
    return keras.losses.categorical_crossentropy(
        _float32(labels), _float32(logits), from_logits=True, label_smoothing=label_smoothing
    )


def softened_kl_divergence(teacher_logits, student_logits, temperature):
    """Per-example KL(softmax(teacher / T) || softmax(student / T)), summed over classes."""
    teacher_log_p = ops.log_softmax(_float32(teacher_logits) / temperature, axis=-1)
    student_log_p = ops.log_softmax(_float32(student_logits) / temperature, axis=-1)
    return ops.sum(ops.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)


def backbone_loss(labels, student_logits, teacher_logits, temperature=4.0, beta=0.9, label_smoothing=0.0):
    """(1 - beta) * CE + beta * T^2 * KL, averaged over the batch (Hinton et al. 2015).

    T^2 keeps the soft term's gradients on the scale of the hard term's whatever T is.
    """
    per_example = 0.0
    if beta < 1:
        per_example = (1 - beta) * cross_entropy(labels, student_logits, label_smoothing)
    if beta > 0:
        per_example = per_example + beta * temperature**2 * softened_kl_divergence(teacher_logits, student_logits, temperature)
    return ops.mean(per_example)


def feature_mse(prediction, target):
    """Mean squared error over every element (PyTorch's MSELoss, as the original)."""
    return ops.mean(ops.square(_float32(prediction) - _float32(target)))


def gaussian_negative_log_likelihood(target, mean, variance):
    """VID's loss: 0.5 * ((t - mu)^2 / sigma^2 + log sigma^2), averaged over every element.

    The constant 0.5 * log(2 pi) is left out; `variance` broadcasts (one value per channel).
    """
    variance = _float32(variance)
    return ops.mean(0.5 * (ops.square(_float32(target) - _float32(mean)) / variance + ops.log(variance)))


def discriminator_loss(teacher_scores, student_scores):
    """Binary cross-entropy of the discriminator's logits: teacher = 1 (real), student = 0 (fake)."""
    return ops.mean(ops.softplus(-_float32(teacher_scores))) + ops.mean(ops.softplus(_float32(student_scores)))


def generator_loss(student_scores):
    """Non-saturating generator loss -log D(student): small when the student passes for the teacher."""
    return ops.mean(ops.softplus(-_float32(student_scores)))


def weighted_total(terms, lambdas):
    """lambda1 * L_backbone + lambda2 * L_intermediate + lambda3 * L_adversarial over the terms present."""
    return sum(weight * terms[name] for name, weight in zip(LOSS_TERMS, lambdas) if name in terms)


# ---------------------------------------------------------------------------------------------
# Networks


def softplus_inverse(value):
    return math.log(math.expm1(value))


class Regressor(keras.layers.Layer):
    """Maps a student stage output (C_s channels) onto the teacher's (C_t channels), same spatial size.

    conv1x1: 1x1 convs C_s -> (C_s + C_t) / 2 -> (C_s + C_t) / 2 -> C_t with ReLU between (the original's).
    constant: a fixed projection giving every teacher channel the mean of the student's channels.
    vid: the conv1x1 mean plus a learnt per-channel variance softplus(alpha) + eps (Ahn et al. 2019).
    """

    def __init__(self, kind, student_channels, teacher_channels, **kwargs):
        super().__init__(**kwargs)
        if kind not in REGRESSORS:
            raise ValueError(f"unknown regressor {kind!r}; choose one of {', '.join(REGRESSORS)}")
        self.kind = kind
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.convs = []
        self.alpha = None
        input_shape = (None, None, None, self.student_channels)
        if kind == "constant":
            self.projection = self.add_weight(
                shape=(self.student_channels, self.teacher_channels), name="projection", trainable=False,
                initializer=keras.initializers.Constant(1.0 / self.student_channels),
            )
        else:
            hidden = max(1, (self.student_channels + self.teacher_channels) // 2)
            for index, (width, activation) in enumerate(((hidden, "relu"), (hidden, "relu"), (self.teacher_channels, None))):
                conv = keras.layers.Conv2D(width, 1, activation=activation, name=f"{self.name}_conv{index + 1}")
                conv.build(input_shape)
                input_shape = (None, None, None, width)
                self.convs.append(conv)
        if kind == "vid":
            self.alpha = self.add_weight(
                shape=(self.teacher_channels,), name="alpha",
                initializer=keras.initializers.Constant(softplus_inverse(VID_INITIAL_VARIANCE - VID_EPSILON)),
            )
        self.built = True

    def call(self, features):
        if self.kind == "constant":
            return ops.matmul(features, ops.cast(self.projection, features.dtype))
        for conv in self.convs:
            features = conv(features)
        return features

    def variance(self):
        """VID's per-channel variance (only for kind 'vid')."""
        return ops.softplus(self.alpha) + VID_EPSILON

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "student_channels": self.student_channels,
                "teacher_channels": self.teacher_channels}


def build_discriminator(class_num=10, name="discriminator"):
    """The original's MLP on logits: class_num -> 512 -> 256 -> 1, BatchNorm + LeakyReLU(0.25).

    It returns a logit (the original's sigmoid is folded into the losses for numerical stability).
    """
    inputs = keras.Input(shape=(class_num,), name=f"{name}_input")
    x = inputs
    for index, width in enumerate((512, 256)):
        x = keras.layers.Dense(width, name=f"{name}_dense{index + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{index + 1}")(x)
        x = keras.layers.LeakyReLU(negative_slope=DISCRIMINATOR_SLOPE, name=f"{name}_relu{index + 1}")(x)
    outputs = keras.layers.Dense(1, name=f"{name}_score")(x)
    return keras.Model(inputs, outputs, name=name)


def _feature_shape(network, layer_name):
    """The output shape of `network`'s layer `layer_name`, a (batch, height, width, channels) map."""
    try:
        layer = network.get_layer(layer_name)
    except ValueError:
        raise ValueError(f"{network.name} has no layer {layer_name}") from None
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # a layer called more than once has no single output
        raise ValueError(f"layer {layer_name} of {network.name} has no single output to hint") from None
    if len(shape) != 4:
        raise ValueError(f"layer {layer_name} of {network.name} outputs {shape}: a hint needs a "
                         "(batch, height, width, channels) feature map")
    return shape


def hint_pairs(teacher, student, hint_layers=None):
    """[(teacher layer, student layer), ...] of the intermediate term, each pair's feature maps of
    the same spatial size (a regressor maps channels, 1x1, position by position); ValueError
    otherwise. None: our ResNet50's four stage outputs in both networks (the original's hints),
    which other models lack: they must name their pairs."""
    if teacher is None:
        return []
    if hint_layers is None:
        names = resnet.stage_output_names()
        for network in (teacher, student):
            present = {layer.name for layer in network.layers}
            missing = [name for name in names if name not in present]
            if missing:
                raise ValueError(f"{network.name} has no layer {missing[0]} (our ResNet50's stage outputs, the "
                                 "default hints): name the teacher:student layer pairs of the intermediate term")
        hint_layers = list(zip(names, names))
    pairs = [(str(teacher_name), str(student_name)) for teacher_name, student_name in hint_layers]
    if not pairs:
        raise ValueError("the intermediate term needs at least one teacher:student layer pair")
    for teacher_name, student_name in pairs:
        teacher_shape = _feature_shape(teacher, teacher_name)
        student_shape = _feature_shape(student, student_name)
        if teacher_shape[1:3] != student_shape[1:3]:
            raise ValueError(f"hint {teacher_name}:{student_name} pairs a {teacher_shape[1]}x{teacher_shape[2]} "
                             f"teacher map with a {student_shape[1]}x{student_shape[2]} student map: the "
                             "spatial sizes must match")
    return pairs


# ---------------------------------------------------------------------------------------------
# The distiller


class Distiller(keras.Model):
    """Trains `student` against a frozen `teacher` with `fit`; `student` is the model to keep.

    A lambda of 0 removes its term and its cost: no regressors or teacher stage outputs without
    lambda2, no discriminator without lambda3. `teacher=None` trains the student on labels alone
    (cross-entropy), the baseline distillation is measured against.

    Every term takes any functional classifier of the same class count (logits or probabilities,
    see `head_model`), as pruning's fine-tuning does with --distill_from. The intermediate term
    pairs the layers `hint_layers` names ([(teacher layer, student layer), ...], see `hint_pairs`;
    by default our ResNet50's four stage outputs).
    """

    def __init__(self, student, teacher=None, lambdas=(0.7, 0.3, 0.2), regressor_name="conv1x1",
                 temperature=4.0, kd_beta=0.9, label_smoothing=0.0, hint_layers=None, **kwargs):
        super().__init__(**kwargs)
        lambdas = tuple(float(value) for value in lambdas)
        if len(lambdas) != 3 or not all(math.isfinite(value) and value >= 0 for value in lambdas):
            raise ValueError(f"lambdas must be three finite numbers >= 0, got {lambdas}")
        if teacher is not None and not any(lambdas):
            raise ValueError("at least one lambda must be positive (or pass no teacher to train on labels alone)")
        if regressor_name not in REGRESSORS:
            raise ValueError(f"unknown regressor {regressor_name!r}; choose one of {', '.join(REGRESSORS)}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= kd_beta <= 1:
            raise ValueError(f"kd_beta must lie in [0, 1], got {kd_beta}")
        self.student = student
        self.teacher = teacher
        self.lambdas = lambdas if teacher is not None else (0.0, 0.0, 0.0)
        self.regressor_name = regressor_name
        self.temperature = float(temperature)
        self.kd_beta = float(kd_beta)
        self.label_smoothing = float(label_smoothing)
        # (teacher layer, student layer) pairs of the intermediate term; none without lambda2.
        self.hint_layers = hint_pairs(teacher, student, hint_layers) if self.lambdas[1] > 0 else []
        # One model per network returning [class scores, hinted layers' outputs...]: each network
        # runs once per step. The scores are logits, or probabilities turned into logits by as_logits.
        self.student_features, self.student_probabilities = head_model(student, [pair[1] for pair in self.hint_layers])
        self.teacher_features, self.teacher_probabilities = None, False
        self.regressors = []
        self.discriminator = None
        if teacher is not None:
            teacher.trainable = False
            if teacher.output_shape[-1] != student.output_shape[-1]:
                raise ValueError(f"the teacher scores {teacher.output_shape[-1]} classes, the student "
                                 f"{student.output_shape[-1]}")
            self.teacher_features, self.teacher_probabilities = head_model(teacher, [pair[0] for pair in self.hint_layers])
            self.teacher_features.trainable = False
            for index, (teacher_name, student_name) in enumerate(self.hint_layers):
                self.regressors.append(Regressor(regressor_name, _feature_shape(student, student_name)[-1],
                                                 _feature_shape(teacher, teacher_name)[-1], name=f"regressor{index + 1}"))
            if self.lambdas[2] > 0:
                self.discriminator = build_discriminator(int(student.output_shape[-1]))
        self.discriminator_optimizer = None
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.logged_terms()}
        self.accuracy_metric = keras.metrics.CategoricalAccuracy(name="accuracy")
        self.built = True

    def logged_terms(self):
        """Names of the per-batch means logged besides 'accuracy'."""
        names = ["loss"]
        if self.teacher is not None:
            names.append("cross_entropy")
            names += [name for name, weight in zip(LOSS_TERMS, self.lambdas) if weight > 0]
            if self.discriminator is not None:
                names.append("discriminator_loss")
        return names

    @property
    def metrics(self):
        return [*self.trackers.values(), self.accuracy_metric]

    def student_variables(self):
        """What the student optimizer trains: the student and the trainable regressors."""
        return list(self.student.trainable_variables) + [v for r in self.regressors for v in r.trainable_variables]

    def compile(self, optimizer, discriminator_optimizer=None, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        if self.discriminator is not None:
            self.discriminator_optimizer = discriminator_optimizer or keras.optimizers.Adam(1e-4)
            self.discriminator_optimizer.build(self.discriminator.trainable_variables)
        # Built here on what it trains (not on every variable of the Distiller, as fit would).
        self.optimizer.build(self.student_variables())

    def call(self, images, training=False):
        return self.student_logits(images, training)

    def student_logits(self, images, training=False):
        return as_logits(_as_list(self.student_features(images, training=training))[0], self.student_probabilities)

    def compute_terms(self, images, labels, training=True):
        """Student logits, the loss terms {name: scalar} and the discriminator's loss (or None)."""
        student_outputs = _as_list(self.student_features(images, training=training))
        student_logits = as_logits(student_outputs[0], self.student_probabilities)
        terms = {"cross_entropy": ops.mean(cross_entropy(labels, student_logits, self.label_smoothing))}
        if self.teacher is None:
            return student_logits, terms, None
        teacher_outputs = _as_list(self.teacher_features(images, training=False))  # frozen BatchNorm statistics
        teacher_logits = ops.stop_gradient(as_logits(teacher_outputs[0], self.teacher_probabilities))
        lambda1, lambda2, lambda3 = self.lambdas
        if lambda1 > 0:
            terms["backbone_loss"] = backbone_loss(labels, student_logits, teacher_logits, self.temperature,
                                                   self.kd_beta, self.label_smoothing)
        if lambda2 > 0:
            hint_losses = []
            for regressor, student_map, teacher_map in zip(self.regressors, student_outputs[1:], teacher_outputs[1:]):
                prediction = regressor(student_map, training=training)
                teacher_map = ops.stop_gradient(teacher_map)
                if regressor.kind == "vid":
                    hint_losses.append(gaussian_negative_log_likelihood(teacher_map, prediction, regressor.variance()))
                else:
                    hint_losses.append(feature_mse(prediction, teacher_map))
            terms["intermediate_loss"] = sum(hint_losses)
        d_loss = None
        if lambda3 > 0:
            # One discriminator pass over teacher and student logits together serves both updates
            # (its BatchNorm sees one batch of both); the student's logits are NOT detached.
            batch = ops.shape(student_logits)[0]
            scores = self.discriminator(ops.concatenate([_float32(teacher_logits), _float32(student_logits)], axis=0),
                                        training=training)
            teacher_scores, student_scores = scores[:batch], scores[batch:]
            terms["adversarial_loss"] = generator_loss(student_scores)
            d_loss = discriminator_loss(teacher_scores, student_scores)
        return student_logits, terms, d_loss

    def total_loss(self, terms):
        if self.teacher is None:
            return terms["cross_entropy"]
        return weighted_total(terms, self.lambdas)

    def student_gradients(self, images, labels):
        """Gradients of the weighted loss with respect to `student_variables()` (for inspection)."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            _, terms, _ = self.compute_terms(images, labels, training=True)
            loss = self.total_loss(terms)
        return tape.gradient(loss, self.student_variables())

    def train_step(self, data):
        import tensorflow as tf

        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        student_variables = self.student_variables()
        # Under a tf.distribute strategy the replicas' gradients are summed: each replica's loss
        # (a mean over its share of the batch) is scaled so the sum is the global batch mean.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape(persistent=self.discriminator is not None) as tape:
            student_logits, terms, d_loss = self.compute_terms(images, labels, training=True)
            loss = self.total_loss(terms)
            # scale_loss: mixed_float16's loss scaling (identity otherwise); apply() unscales.
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
            scaled_d_loss = None if d_loss is None else self.discriminator_optimizer.scale_loss(d_loss / replicas)
        self.optimizer.apply(tape.gradient(scaled_loss, student_variables), student_variables)
        if d_loss is not None:
            # The student's loss depends on the discriminator too; only d_loss trains it.
            d_variables = self.discriminator.trainable_variables
            self.discriminator_optimizer.apply(tape.gradient(scaled_d_loss, d_variables), d_variables)
            terms["discriminator_loss"] = d_loss
        del tape
        terms["loss"] = loss
        for name, tracker in self.trackers.items():
            tracker.update_state(terms[name])
        self.accuracy_metric.update_state(labels, student_logits)
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, data):
        # Validation measures the student alone: cross-entropy on labels and accuracy.
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.student_logits(images, training=False)
        self.trackers["loss"].update_state(ops.mean(cross_entropy(labels, logits)))
        self.accuracy_metric.update_state(labels, logits)
        return {"loss": self.trackers["loss"].result(), "accuracy": self.accuracy_metric.result()}
