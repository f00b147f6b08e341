"""Output folders a user can trust: validation before any change, --overwrite that keeps a finished
run until the new one is under way, one run per folder, inputs compared by content."""

import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import pytest

from cnn_compression import checkpoints
from cnn_compression import files
import model as resnet
from conftest import REPO, assert_one_line_error, folder_bytes, run_in_process, run_script

SMALL = ["--width", "0.0625", "--stem", "cifar", "--dataset", "sample", "--train_size", "100", "--batch_size", "50",
         "--epoch_num", "1", "--warmup_epochs", "0", "--verbose", "0"]


def keras3_weights(path, seed):
    """A Keras 3 `.weights.h5` (model.save_weights) of a width-0.0625 ResNet50 with a 5-class head."""
    keras.utils.set_random_seed(seed)
    resnet.build_resnet50(resnet.width_spec(0.0625), "cifar", class_num=5).save_weights(path)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished base run started from a Keras 3 weights file."""
    root = tmp_path_factory.mktemp("finished")
    pretrained = keras3_weights(str(root / "pretrained.weights.h5"), seed=1)
    folder = str(root / "base")
    completed = run_in_process("train_base_model.py", "--save_folder", folder, "--model_path", pretrained, *SMALL,
                           "--tensorboard", str(root / "logs"))
    return root, folder, pretrained, completed


def test_tensorboard_logs_are_written_per_fit(finished):
    root = finished[0]
    events = [name for _, _, names in os.walk(root / "logs" / "base") for name in names if name.startswith("events.out")]
    assert events  # Keras' TensorBoard callback, one folder per fitted stage folder


def test_keras3_weights_file_loads_by_class_and_position(finished, tmp_path):
    _, folder, pretrained, completed = finished
    source = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar", class_num=5)
    source.load_weights(pretrained)
    with_weights = [layer for layer in source.layers if layer.weights]
    assert f"loaded {len(with_weights) - 1} layers by name" in completed.stdout
    assert "skipped 1 of another shape (predictions)" in completed.stdout
    target = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    loaded, skipped = checkpoints.load_weights_by_name(target, pretrained)
    assert (loaded, skipped) == (len(with_weights) - 1, ["predictions"])
    for layer in with_weights[:-1]:
        for have, want in zip(target.get_layer(layer.name).get_weights(), layer.get_weights()):
            assert (have == want).all(), layer.name


def test_overwrite_with_bad_input_leaves_the_finished_run_untouched(finished, tmp_path):
    _, folder, pretrained, _ = finished
    before = folder_bytes(folder)
    text = tmp_path / "notes.txt"
    text.write_text("not data")
    for flags in (["--data_dir", str(text), "--dataset", "cifar10"], ["--model_path", str(text)]):
        arguments = [*SMALL, "--model_path", pretrained, *flags, "--overwrite"]
        completed = run_in_process("train_base_model.py", "--save_folder", folder, *arguments, check=False)
        assert_one_line_error(completed)
        assert folder_bytes(folder) == before, flags


def test_inputs_are_compared_by_content_not_by_path(finished, tmp_path):
    _, folder, pretrained, _ = finished
    moved = str(tmp_path / "elsewhere.weights.h5")
    shutil.copyfile(pretrained, moved)
    again = run_in_process("train_base_model.py", "--save_folder", folder, "--model_path", moved, *SMALL,
                       "--data_dir", str(tmp_path))  # --dataset sample: where CIFAR-10 lies does not matter
    assert "nothing to do" in again.stdout
    before = folder_bytes(folder)
    keras3_weights(moved, seed=2)  # other weights at that path
    other = run_in_process("train_base_model.py", "--save_folder", folder, "--model_path", moved, *SMALL, check=False)
    assert "pretrained contents" in assert_one_line_error(other)
    assert folder_bytes(folder) == before


def test_a_flag_newer_than_the_stored_run_counts_as_its_default():
    """A run made before a flag existed had the flag's default: resuming it with the default is the
    same run (also where the stage resolves the default later, as --precision auto), another value
    makes another run. Flags the stored run knew are compared as ever."""
    import train_base_model
    from cnn_compression import stages

    def stored(args, *left_out):  # config.json's "arguments", without the flags `left_out`
        arguments = stages._as_json(vars(args))
        return {"arguments": {key: value for key, value in arguments.items() if key not in left_out}}

    older_run = stored(train_base_model.parse_args([]), "label_smoothing", "precision")
    resumed = train_base_model.parse_args([])
    resumed.precision = "float32"  # start_stage's resolution of auto on a CPU without native bfloat16
    assert stages.changed_arguments(older_run, resumed) == []
    other = train_base_model.parse_args(["--label_smoothing", "0.1", "--precision", "mixed_bfloat16"])
    assert stages.changed_arguments(older_run, other) == ["label_smoothing", "precision"]
    assert stages.changed_arguments(stored(train_base_model.parse_args([])),
                                    train_base_model.parse_args(["--epoch_num", "3"])) == ["epoch_num"]


def test_a_failed_start_creates_nothing_and_the_corrected_retry_runs(tmp_path):
    folder = tmp_path / "base"
    for flags in (["--dataset", "cifar10", "--data_dir", str(tmp_path / "missing")], ["--model_path", str(tmp_path / "none.h5")]):
        completed = run_in_process("train_base_model.py", "--save_folder", str(folder), *SMALL, *flags, check=False)
        assert_one_line_error(completed)
        assert not folder.exists(), flags
    folder.mkdir()
    completed = run_in_process("train_base_model.py", "--save_folder", str(folder), *SMALL, "--model_path",
                               str(tmp_path / "none.h5"), check=False)
    assert_one_line_error(completed)
    assert os.listdir(folder) == []


@pytest.mark.parametrize("script", ["train_base_model.py", "prune_model.py"])
def test_a_folder_filled_by_another_run_during_start_up_is_refused_before_the_first_write(script, tmp_path, monkeypatch):
    """The output folder is checked where start-up first reads it and again where it first writes
    (lock_output_folder): another run may take it while the data loads."""
    from cnn_compression import stages
    from test_prune_any_model import small_classifier

    folder = tmp_path / "out"
    load_split = stages.load_split

    def load_while_another_run_writes(args):
        split = load_split(args)
        (folder / "other").mkdir(parents=True)
        (folder / "other" / "config.json").write_text("{}\n")
        return split

    monkeypatch.setattr(stages, "load_split", load_while_another_run_writes)
    if script == "prune_model.py":
        small_classifier().save(str(tmp_path / "base.h5"))
        flags = ["--root_folder", folder, "--base_model_path", tmp_path / "base.h5", "--criterion", "fraction"]
    else:
        flags = ["--save_folder", folder, *SMALL]
    line = assert_one_line_error(run_in_process(script, *flags, "--dataset", "sample", check=False))
    assert "holds other runs in its subfolders (other)" in line
    assert os.listdir(folder) == ["other"]  # no lock, no config.json


def test_overwrite_sets_the_old_run_aside_until_the_new_one_has_an_epoch(finished, tmp_path):
    _, original, pretrained, _ = finished
    folder = str(tmp_path / "copy")
    shutil.copytree(original, folder)
    before = folder_bytes(folder)
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen([sys.executable, "train_base_model.py", "--save_folder", folder, *SMALL,
                                "--epoch_num", "3", "--overwrite"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    aside = os.path.join(folder, files.REPLACED_FOLDER)
    deadline = time.monotonic() + 120
    while not os.path.isdir(aside) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # the replacement dies before its first epoch
    process.wait()
    assert folder_bytes(aside) == before  # the finished run, whole, recoverable
    completed = run_in_process("train_base_model.py", "--save_folder", folder, *SMALL, "--epoch_num", "3", "--overwrite")
    assert "starting" in completed.stdout
    assert not os.path.exists(aside) and sorted(os.listdir(folder)) == ["config.json", "history.json", "model.h5"]


def hold_lock(folder):
    """A separate process holding `folder`'s lock until killed; returns it once the lock is held."""
    code = ("import sys, time; from cnn_compression import files; lock = files.FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, folder], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_busy_folder_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    folder = str(tmp_path / "busy")
    os.makedirs(folder)
    holder = hold_lock(folder)
    try:
        # in process: the holder is another process all the same
        completed = run_in_process("train_base_model.py", "--save_folder", folder, *SMALL, check=False)
        line = assert_one_line_error(completed)
        assert f"PID {holder.pid}" in line and "in use" in line
        assert os.listdir(folder) == [files.LOCK_NAME]  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with files.FolderLock(folder):  # the kernel released the dead holder's lock
        assert open(os.path.join(folder, files.LOCK_NAME)).read().strip() == str(os.getpid())
    assert not os.path.exists(os.path.join(folder, files.LOCK_NAME))


@pytest.mark.slow  # make test-all (the busy-folder test above covers the refusal)
def test_two_runs_at_once_one_refused_the_other_whole(tmp_path):
    folder = str(tmp_path / "race")
    first = subprocess.Popen([sys.executable, "train_base_model.py", "--save_folder", folder, *SMALL, "--epoch_num", "2"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(folder, files.LOCK_NAME)
    deadline = time.monotonic() + 120
    while not os.path.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = run_script("train_base_model.py", "--save_folder", folder, *SMALL, "--epoch_num", "2", check=False)
    assert f"PID {first.pid}" in assert_one_line_error(second)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    import json

    config = json.load(open(os.path.join(folder, "config.json")))
    history = json.load(open(os.path.join(folder, "history.json")))
    assert config["complete"] and config["results"]["best_val_acc"] == max(history["val_acc"])


def test_the_original_commands_never_touch_the_committed_runs():
    # Typed as the original README has them (with data, so they get past loading it): each stops at once.
    commands = [
        ["train_base_model.py", "--save_folder=./model/base_model", "--model_path=./model/pretrained_resnet50.h5"],
        ["knowledge_distillation.py", "--root_folder=./model/pruned_model/iter15", "--lambda1=0.7,", "--lambda2=0.3,",
         "--lambda3=0.2,", "--regressor_name=conv1x1"],
    ]
    before = folder_bytes(os.path.join(REPO, "model"))
    for command in commands:
        completed = run_in_process(*command, "--dataset", "sample", check=False)
        line = assert_one_line_error(completed)
        assert "other arguments" in line or "holds other runs" in line, line
    assert folder_bytes(os.path.join(REPO, "model")) == before


def test_plot_typo_suggestion_answers_fast_near_the_root():
    started = time.monotonic()
    completed = run_script("plot_train_history.py", "--history_path", "/nonexistent_dir/history.json", check=False,
                           timeout=60)
    assert "no history at /nonexistent_dir/history.json" in assert_one_line_error(completed)
    assert time.monotonic() - started < 30
