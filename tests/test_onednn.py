"""oneDNN is on wherever our code loads TensorFlow, unless the user says otherwise."""

import os
import subprocess
import sys

from conftest import REPO

PROBE = ("import os, {module}, tensorflow; from cnn_compression import onednn; "
         "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), onednn.enabled())")


def probe(module, setting):
    environment = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        environment["TF_ENABLE_ONEDNN_OPTS"] = setting
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=REPO, env=environment,
                            capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_scripts_and_library_turn_onednn_on_before_tensorflow_loads():
    # cli: every script's first import; model: a library user's. Both must come before TensorFlow.
    # The variable as well as the result: CPUs with AMX or AVX512-VNNI have oneDNN on without it.
    assert probe("cnn_compression.cli", None) == "1 True"
    assert probe("model", None) == "1 True"


def test_the_users_setting_stands():
    assert probe("cnn_compression.cli", "0") == "0 False"
