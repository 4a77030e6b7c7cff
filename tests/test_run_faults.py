"""Termination signals and full disks (issue 25): the pieces; tests/bad_inputs.py runs them end
to end (a runner killed mid-stage, in-process and on Ray; a disk full in the runner and in a
stage; a disk too small for stage 01)."""
import errno
import os
import signal
import time

import pytest

import nd_utils.pipeline as pipeline
from nd_utils import __main__ as cli
from nd_utils import run_faults as rf


def test_sigterm_inside_the_block_is_an_interrupt_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(rf.RunTerminated) as got:
        with rf.terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                      # the handler raises before this ends
    assert isinstance(got.value, KeyboardInterrupt) and got.value.exit_code == 143
    assert str(got.value) == "SIGTERM" and rf.signal_record(got.value) == {"signal": "SIGTERM"}
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_during_the_clean_up_is_ignored():
    cleaned = []
    with pytest.raises(rf.RunTerminated):
        with rf.terminate_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)   # e.g. SLURM repeating itself
                time.sleep(0.2)
                cleaned.append(True)
    assert cleaned == [True]


def test_signals_are_taken_back_from_a_library_that_replaced_the_handler():
    with rf.terminate_as_interrupt():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)     # what ray.init does, in C
        rf.reclaim_signals()
        with pytest.raises(rf.RunTerminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    rf.reclaim_signals()                                  # outside the block: no change
    assert signal.getsignal(signal.SIGTERM) is not rf._raise_terminated


def test_the_command_line_exits_128_plus_the_signal(monkeypatch, capsys):
    def terminated(*a, **k):
        raise rf.RunTerminated(signal.SIGTERM)

    monkeypatch.setattr(pipeline, "run_pipeline", terminated)
    assert cli.main(["run", "offline"]) == 143
    assert "terminated by SIGTERM: rerun the same command" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    assert cli.main(["run", "offline"]) == 130


def test_a_full_disk_is_recognised_and_explained(tmp_path):
    assert rf.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert rf.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not rf.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert rf.is_disk_full("OSError: [Errno 28] No space left on device: '/x'")
    msg = rf.disk_full_message(tmp_path / "not" / "yet", "run.json")
    free, total = rf.free_bytes(tmp_path)
    assert f"{rf.human_bytes(free)} free of {rf.human_bytes(total)}" in msg
    assert str(tmp_path / "not" / "yet") in msg and "rerun the same command" in msg


def test_the_stage_01_estimate_and_the_warning(tmp_path):
    # 113,000 images x ResNet-50's 4,904 pooled neurons + one 512-d feature job (<= 1,024)
    need = rf.stage01_bytes(113_000, {"all": 4904}, n_feature_jobs=1)
    assert need == 2 * 113_000 * (4904 + 1024) * 4 + rf.RUN_FOLDER_BYTES
    assert rf.check_free_space(tmp_path, 1, "stage 01") is None
    with pytest.warns(UserWarning, match=r"stage 01 needs about .* free"):
        msg = rf.check_free_space(tmp_path, 10**18, "stage 01")
    assert "--set data_dir=" in msg
