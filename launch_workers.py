"""Start N local workers of a stage under `--distribute multi_worker` and wait for them.

    python launch_workers.py --workers 2 -- train_base_model.py --save_folder=./model/base_model --distribute multi_worker

Each worker is the same command with its own TF_CONFIG (127.0.0.1 and a free port each); worker 0
is the chief, whose output is shown (the others' go to --log_dir, if given). When a worker fails,
the others are stopped; the exit code is the first failure's (0 when all succeed). For trying
multi-worker training on one machine and for the tests; across machines, set TF_CONFIG by hand on
each (see docs/distributed.md).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_ports(count):
    """`count` distinct ports the kernel reports free right now on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def tf_configs(ports):
    workers = [f"127.0.0.1:{port}" for port in ports]
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            for index in range(len(ports))]


def launch(command, workers, log_dir=None, cpus_per_worker=None, timeout=None, python=sys.executable):
    """Run `command` (a script and its flags) as `workers` local workers; returns the exit code."""
    processes = []
    cpus = sorted(os.sched_getaffinity(0)) if cpus_per_worker else None
    for index, config in enumerate(tf_configs(free_ports(workers))):
        environment = {**os.environ, "TF_CONFIG": config}
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            output = open(os.path.join(log_dir, f"worker{index}.log"), "w")
        else:
            output = None if index == 0 else subprocess.DEVNULL
        affinity = None
        if cpus:
            chosen = {cpus[(index * cpus_per_worker + k) % len(cpus)] for k in range(cpus_per_worker)}
            affinity = (lambda chosen=chosen: os.sched_setaffinity(0, chosen))
        processes.append(subprocess.Popen([python, *command], env=environment, stdout=output,
                                          stderr=subprocess.STDOUT if log_dir else None, preexec_fn=affinity))
    deadline = None if timeout is None else time.monotonic() + timeout
    failure = None
    try:
        while any(process.poll() is None for process in processes):
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                failure = failed[0] if failed else 124
                break
            time.sleep(0.1)
    finally:
        for process in processes:  # a failed or timed-out job: the others would wait for it forever
            if process.poll() is None and failure is not None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if failure is not None:
        return failure
    return next((process.returncode for process in processes if process.returncode), 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log_dir", default=None, help="write each worker's output to LOG_DIR/worker<i>.log")
    parser.add_argument("--cpus_per_worker", type=int, default=None,
                        help="pin each worker to this many CPU cores (for measuring on one machine)")
    parser.add_argument("--timeout", type=float, default=None, help="stop every worker after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py and its flags")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.workers < 1:
        parser.error("give --workers N (N >= 1) and, after --, the script and its flags")
    sys.exit(launch(command, args.workers, args.log_dir, args.cpus_per_worker, args.timeout))


if __name__ == "__main__":
    main()
