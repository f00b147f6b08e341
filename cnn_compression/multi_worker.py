"""Training across machines: tf.distribute.MultiWorkerMirroredStrategy from TF_CONFIG.

Every worker runs the same command with its own TF_CONFIG, for example on worker 1 of two:

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 1}}'

The global batch (--batch_size) is split across workers, and each worker's tf.data pipeline is
sharded by Keras so it sees its own share of every epoch. Only the chief (worker 0, or the task of
type "chief") writes the output folder; every other worker works in a copy of it in a temporary
folder (so it takes the same resume decisions as the chief) that is removed at exit.

Keras 3.15's `fit` does not run under this strategy as shipped (keras-team/keras#20585): it builds
the model by reducing one batch across workers eagerly, and it averages scalar logs across
workers along an axis they do not have. `patch_keras_fit` fixes both, for multi-worker strategies only.
"""

import atexit
import json
import os
import shutil
import socket
import tempfile

from cnn_compression.cli import UserError


def read_tf_config(environ=None):
    """(cluster {type: [addresses]}, task type, task index) from $TF_CONFIG, validated."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG")
    if not raw:
        raise UserError("--distribute multi_worker needs TF_CONFIG: each worker's cluster and index, e.g. "
                        "'{\"cluster\": {\"worker\": [\"host0:12345\", \"host1:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}'")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], task["index"]
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"TF_CONFIG is malformed ({type(error).__name__}: {error}); it needs \"cluster\" and \"task\" "
                        "with \"type\" and \"index\"") from None
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(addresses, list) and addresses and all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)
            for addresses in cluster.values()):
        raise UserError("TF_CONFIG's cluster must map task types to lists of host:port addresses")
    if set(cluster) - {"chief", "worker"}:
        raise UserError(f"TF_CONFIG's cluster has task types {sorted(set(cluster) - {'chief', 'worker'})}: "
                        "MultiWorkerMirroredStrategy takes only chief and worker")
    if task_type not in cluster:
        raise UserError(f"TF_CONFIG's task type {task_type!r} is not in its cluster ({', '.join(sorted(cluster))})")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise UserError(f"TF_CONFIG's task index {index!r} is outside the cluster's {len(cluster[task_type])} "
                        f"{task_type} address(es)")
    return cluster, task_type, index


def is_chief(cluster, task_type, index):
    """The chief writes the results: the "chief" task, else worker 0."""
    return task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)


def check_port_free(address):
    """This worker's own port must be free on this machine (else TensorFlow fails deep inside)."""
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            raise UserError(f"port {port} of this worker's address {address} (TF_CONFIG) is in use") from None


def make_strategy():
    """The strategy of `--distribute multi_worker`, after checking TF_CONFIG and this worker's port."""
    import tensorflow as tf

    cluster, task_type, index = read_tf_config()
    check_port_free(cluster[task_type][index])
    patch_keras_fit()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy):
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def patch_keras_fit():
    """Make Keras 3.15's `fit` run under MultiWorkerMirroredStrategy (see the module's docstring)."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_multi_worker_patched", False):
        return
    keras_reduce = trainer.reduce_per_replica
    keras_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if is_multi_worker(strategy) and reduction in ("auto", "mean"):
            # Keras reduces along axis 0, which the scalar logs lack.
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not is_multi_worker(strategy):
            return keras_build(self, iterator=iterator, data_batch=data_batch)
        # Build from this worker's own first batch: shapes are all the build needs, and an eager
        # cross-worker reduce is what fails.
        for _, _, batches in iterator:
            batch = next(batches)
            break
        local = tree.map_structure(
            lambda value: strategy.experimental_local_results(value)[0]
            if isinstance(value, tf.distribute.DistributedValues) else value, batch)
        with strategy.scope():
            self._symbolic_build(data_batch=local)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer._multi_worker_patched = True


def worker_folder(folder, strategy):
    """Where this worker writes: `folder` itself on the chief (and without multi-worker training);
    else a temporary copy of it, removed at exit, so the worker resumes exactly as the chief does."""
    if strategy is None or not is_multi_worker(strategy):
        return folder
    cluster, task_type, index = read_tf_config()
    if is_chief(cluster, task_type, index):
        return folder
    remove_dead_scratch(task_type, index)
    scratch = tempfile.mkdtemp(prefix=f"{task_type}{index}-pid{os.getpid()}-")
    atexit.register(shutil.rmtree, scratch, True)
    copy = os.path.join(scratch, os.path.basename(os.path.normpath(folder)) or "run")
    if os.path.isdir(folder):
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".lock", ".tmp-*"))
    return copy


def remove_dead_scratch(task_type, index):
    """Delete scratch copies left by killed workers of this task (no atexit runs after SIGKILL)."""
    prefix = f"{task_type}{index}-pid"
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
