"""android.py: the adb commands a phone run issues (a fake adb runs the runner on this machine), the runner's
timing line, and one clear error for each missing piece."""
import pytest

import android
from conftest import FAKE_RUNNER, write_script


def test_android_pushes_runs_parses_and_cleans_up(fake_adb, tmp_path):
    log = fake_adb()
    program = tmp_path / "tiny-decode.pte"
    program.write_bytes(b"a program")
    runner = write_script(tmp_path / "executor_runner", FAKE_RUNNER)
    timings = android.android_rows({"tiny-decode": program}, runner, "", runs=3, threads=1)
    assert timings == {"tiny-decode": 12.5 / 3}                                # the runner's line, parsed
    calls = log.read_text().splitlines()
    remote = android.REMOTE_DIR
    assert calls[0] == "devices"
    assert f"-s emulator-5554 push {runner} {remote}/executor_runner" in calls
    assert f"-s emulator-5554 push {program} {remote}/{program.name}" in calls
    assert (f"-s emulator-5554 shell {remote}/executor_runner --model_path={remote}/{program.name} "
            "--num_executions=3 --cpu_threads=1") in calls
    assert calls[-1] == f"-s emulator-5554 shell rm -rf {remote}"
    assert not (tmp_path / "device" / "nanomobilellm").exists()


def test_parse_runner_ms():
    assert android.parse_runner_ms("x\nModel executed successfully 4 time(s) in 10.0 ms.\n") == 2.5
    with pytest.raises(android.AndroidError, match="timing line"):
        android.parse_runner_ms("Segmentation fault")


def test_android_errors(fake_adb, tmp_path, monkeypatch):
    runner = write_script(tmp_path / "executor_runner", FAKE_RUNNER)
    with pytest.raises(android.AndroidError, match="runner .* not found"):
        android.android_rows({}, tmp_path / "missing_runner", "", 1, 1)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(android.AndroidError, match="adb is not on PATH"):
        android.android_rows({}, runner, "", 1, 1)
    fake_adb(devices="")
    with pytest.raises(android.AndroidError, match="no Android device"):
        android.android_rows({}, runner, "", 1, 1)
    fake_adb(devices="R58M123\tunauthorized")                  # listed, but not usable: not "lists none"
    with pytest.raises(android.AndroidError, match=r"device ready: R58M123 is unauthorized \(unauthorized: accept"):
        android.android_rows({}, runner, "", 1, 1)
    fake_adb(devices="A\tdevice\nB\tdevice")
    with pytest.raises(android.AndroidError, match="choose one with --serial"):
        android.android_rows({}, runner, "", 1, 1)
    with pytest.raises(android.AndroidError, match="'C' is not connected"):
        android.android_rows({}, runner, "C", 1, 1)
