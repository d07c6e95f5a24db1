"""
Timing programs on an Android phone for bench_mobile.py --device android: ExecuTorch's executor_runner (built
for arm64 with XNNPACK, docs/on-device.md) and each .pte are pushed over adb, run --num_executions times, timed
by the runner's own line, and removed again. Every missing piece (runner, adb, device) is one clear error
before anything is pushed.
"""
import re
import shutil
import subprocess
from pathlib import Path

from export import ExportError


class AndroidError(ExportError):
    """A run on a phone that cannot start or finish: no runner, adb or device, or a failed adb command."""


REMOTE_DIR = "/data/local/tmp/nanomobilellm"
RUNNER_LINE = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")


def adb(serial, *args, check=True):
    cmd = ["adb", *(["-s", serial] if serial else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode:
        raise AndroidError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    return result.stdout


def android_device(serial):
    """The serial to use; one clear error when adb or a device is missing."""
    if shutil.which("adb") is None:
        raise AndroidError("adb is not on PATH: install Android platform-tools "
                         "(https://developer.android.com/tools/releases/platform-tools)")
    listed = [line.split() for line in adb(None, "devices").splitlines()              # "SERIAL\tSTATE" lines
              if len(line.split()) == 2 and not line.startswith(("*", "List of"))]
    devices = [fields[0] for fields in listed if fields[-1] == "device"]
    if not devices and listed:              # unauthorized (the phone's "Allow USB debugging?" prompt), offline
        states = ", ".join(f"{fields[0]} is {fields[-1]}" for fields in listed)
        raise AndroidError(f"no Android device ready: {states} (unauthorized: accept the phone's USB debugging "
                           "prompt; offline: reconnect it)")
    if not devices:
        raise AndroidError("no Android device: connect one with USB debugging on (`adb devices` lists none)")
    if serial and serial not in devices:
        raise AndroidError(f"device {serial!r} is not connected; `adb devices` lists: {', '.join(devices)}")
    if not serial and len(devices) > 1:
        raise AndroidError(f"several devices connected ({', '.join(devices)}): choose one with --serial")
    return serial or devices[0]


def parse_runner_ms(output):
    """executor_runner's 'Model executed successfully N time(s) in X ms.' -> ms per execution."""
    match = RUNNER_LINE.search(output)
    if not match:
        raise AndroidError(f"could not find the runner's timing line in its output:\n{output[-500:]}")
    return float(match.group(2)) / int(match.group(1))


def android_target(runner, serial):
    """(runner path, device serial) for a run on a phone; one clear error for a missing runner, adb or device."""
    build = "build ExecuTorch's executor_runner for arm64 with XNNPACK (docs/on-device.md)"
    if not runner:
        raise AndroidError(f"--device android needs --runner: {build}")
    if not Path(runner).is_file():
        raise AndroidError(f"runner {str(runner)!r} not found: {build} and pass it with --runner")
    return Path(runner), android_device(serial)


def android_rows(programs, runner, serial, runs, threads):
    """Push the runner and each program ({label: path}), time `runs` executions of each, clean up.
    Returns {label: ms per execution}."""
    runner, serial = android_target(runner, serial)
    remote_runner = f"{REMOTE_DIR}/{runner.name}"
    results = {}
    try:
        adb(serial, "shell", "mkdir", "-p", REMOTE_DIR)
        adb(serial, "push", str(runner), remote_runner)
        adb(serial, "shell", "chmod", "+x", remote_runner)
        for label, path in programs.items():
            remote = f"{REMOTE_DIR}/{Path(path).name}"
            adb(serial, "push", str(path), remote)
            out = adb(serial, "shell", remote_runner, f"--model_path={remote}", f"--num_executions={runs}",
                      f"--cpu_threads={threads}")
            results[label] = parse_runner_ms(out)
            adb(serial, "shell", "rm", "-f", remote)
    finally:
        adb(serial, "shell", "rm", "-rf", REMOTE_DIR, check=False)
    return results
