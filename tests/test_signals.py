"""SIGTERM (SLURM, Kubernetes, `timeout`) stops a command like Ctrl-C: one `atcache:` line saying what was kept and how
to continue, exit 128 + the signal, no traceback, and what was finished stays (a build's row-chunks, a trainer's
last.pt). The signal goes to the CLI process alone (`timeout`, `kill`) or to its whole process group (SLURM, a
terminal's Ctrl-C), DataLoader workers and device processes included."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atcache.cache.store import CacheStore
from atcache.errors import AtcacheError, Interrupted, explain_interruption, signals_held, stop_on_signals
from helpers import COMMON, assert_clean, cli_command, invoke
from atcache.train.checkpoints import ResumableTraining

HOOKS = Path(__file__).with_name("signal_hooks")  # its sitecustomize.py slows builds and gives trainers loader workers


def started(cmd: list[str], **hooks) -> subprocess.Popen:
    """`cmd` in a fresh process group (so a group signal reaches it and its children only), offline, with the test
    hooks of signal_hooks/sitecustomize.py set in `hooks`."""
    path = os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": path, **hooks})


def stop_when(proc: subprocess.Popen, ready, signum: int, group: bool, timeout: float = 300) -> tuple[str, str]:
    """Send `signum` to `proc` (or its process group) once ready() holds; returns its (stdout, stderr) after it exits."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, "never got ready"
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before the signal: {proc.communicate()[1][-2000:]}"
    (os.killpg if group else os.kill)(proc.pid, signum)
    return proc.communicate(timeout=timeout)


def the_line(stderr: str) -> str:
    """The one `atcache:` line of an interrupted command's stderr (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("atcache:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------- the mechanism
@pytest.fixture(autouse=True)
def sigchld_handler_kept():
    """A stop signal takes torch's SIGCHLD handler away for good (the CLI process is on its way out); not pytest's."""
    handler = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, handler)


def test_sigterm_raises_interrupted_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread at once
    assert (e.value.signum, e.value.exit_code) == (signal.SIGTERM, 143)
    assert e.value.line() == "atcache: stopped by SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_innermost_explanation_wins_and_errors_after_a_signal_are_the_interruption():
    with pytest.raises(Interrupted) as e:
        with stop_on_signals(), explain_interruption(lambda: "outer"), explain_interruption(lambda: "inner"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert e.value.line() == "atcache: stopped by SIGTERM; inner"
    with pytest.raises(Interrupted) as e:  # e.g. torch's "DataLoader worker killed", a wait re-raised as another error
        with stop_on_signals(), explain_interruption(lambda: "kept"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Interrupted:
                raise AtcacheError("writing to cache failed (Interrupted)") from None
    assert (e.value.signum, e.value.message) == (signal.SIGTERM, "kept")
    with pytest.raises(Interrupted) as e:  # Ctrl-C under the default handler
        with explain_interruption(lambda: "kept"):
            raise KeyboardInterrupt
    assert e.value.line() == "atcache: interrupted (Ctrl-C); kept" and e.value.exit_code == 130
    with pytest.raises(AtcacheError):  # without a signal an error stays an error
        with stop_on_signals(), explain_interruption(lambda: "kept"):
            raise AtcacheError("bad")


def test_held_signals_act_after_the_block():
    done = []
    with pytest.raises(Interrupted):
        with stop_on_signals():
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # SLURM's and a parent's forward: one interruption
                time.sleep(0.2)
                done.append(1)
            done.append(2)
    assert done == [1]


class Ultralytics:
    """The BaseTrainer steps ResumableTraining wraps, as ultralytics does them where it matters: save_model writes
    last.pt in place (here a SIGTERM lands halfway), resume_training continues after the checkpoint's epoch."""

    def __init__(self, tmp_path):
        self.wdir = tmp_path / "weights"
        self.wdir.mkdir()
        self.last, self.best, self.csv = self.wdir / "last.pt", self.wdir / "best.pt", tmp_path / "results.csv"
        self.epoch, self.epochs, self.ddp, self.resume = 1, 3, False, False
        self.settings = type("Settings", (), {"mode": "cache"})()

    def save_model(self):
        self.last.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        self.last.write_bytes(b"whole")
        return True

    def resume_training(self, ckpt):
        self.resume, self.start_epoch = True, ckpt["epoch"] + 1
        self.args = type("Args", (), {"resume": str(self.last)})()


class Trainer(ResumableTraining, Ultralytics):
    pass


def test_last_pt_is_written_whole_before_a_sigterm_acts(tmp_path):
    """A SIGTERM in the middle of ultralytics' save_model: last.pt is the new checkpoint, whole, no temporary file is
    left, and the interruption then names the epochs it holds."""
    trainer = Trainer(tmp_path)
    trainer.last.write_bytes(b"epoch 1")
    with pytest.raises(Interrupted) as e:
        with stop_on_signals(), explain_interruption(trainer.interruption):
            trainer.save_model()
    assert trainer.last.read_bytes() == b"whole" and [p.name for p in trainer.wdir.iterdir()] == ["last.pt"]
    assert e.value.line() == (f"atcache: stopped by SIGTERM; epochs 1-2 are kept in {trainer.last}: continue with "
                              f"atcache train-from-cache ... resume={trainer.last} (the same options)")


def test_resume_drops_result_rows_after_the_checkpoint(tmp_path):
    """Stopped after epoch 3's row of results.csv was written but before its last.pt: resuming from epoch 2's last.pt
    does not log epoch 3 twice."""
    trainer = Trainer(tmp_path)
    trainer.csv.write_text("epoch,time\n1,0.5\n2,1.0\n3,1.5\n")
    trainer.resume_training({"epoch": 1})
    assert trainer.csv.read_text() == "epoch,time\n1,0.5\n2,1.0\n"
    assert trainer.interruption().startswith(f"epochs 1-2 are kept in {trainer.last}: continue with")


# ---------------------------------------------------------------------------------------------------- build-cache
RUNNERS = {"here": [], "devices": ["--device", "cpu,cpu"], "dask": ["--scheduler", "local:2"]}  # 1 thread each, as here


def build_command(voc_yaml, teacher_pt, out, runner: str, workers: int = 0) -> list[str]:
    """build-cache of the test data in 8 row-chunks of 4 rows (the shared cache's batches) on `runner`."""
    cmd = cli_command(voc_yaml, teacher_pt, out, "--chunk-rows", "4")
    cmd[cmd.index("--workers") + 1] = str(workers)
    for flag, value in zip(RUNNERS[runner][::2], RUNNERS[runner][1::2]):
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    return cmd


def a_chunk_is_done(out: Path):
    chunks = out / "done" / "c"  # a done chunk's file appears once its row-chunk is written (renamed into place)
    return lambda: chunks.is_dir() and any("." not in f.name for f in chunks.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("runner,signum,group,workers", [
    ("here", signal.SIGTERM, False, 0),  # `timeout`, `kill`
    ("here", signal.SIGTERM, True, 2),  # SLURM: the DataLoader workers get it too
    ("here", signal.SIGINT, True, 2),  # a terminal's Ctrl-C
    ("devices", signal.SIGTERM, False, 0),  # the parent passes it on to its device processes
    ("devices", signal.SIGTERM, True, 0),
    ("dask", signal.SIGTERM, False, 0),
    ("dask", signal.SIGTERM, True, 0),
], ids=["here-kill", "here-slurm-workers", "here-ctrl-c", "devices-kill", "devices-slurm", "dask-kill", "dask-slurm"])
def test_stopped_build_keeps_its_chunks_and_resume_completes_it(runner, signum, group, workers, built_cache, voc_yaml,
                                                                teacher_pt, tmp_path, assert_same_store):
    out = tmp_path / "c.zarr"
    cmd = build_command(voc_yaml, teacher_pt, out, runner, workers)
    proc = started(cmd, ATCACHE_TEST_BATCH_DELAY="0.5")  # 8 chunks of one batch each: >= 4 s of build after the first
    _, stderr = stop_when(proc, a_chunk_is_done(out), signum, group)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
    assert the_line(stderr) == (f"atcache: {how}; the finished chunks of {out} are kept: rerun the same command with "
                                "--resume to continue")
    assert [line for line in stderr.splitlines() if line.strip()] == [the_line(stderr)]  # nothing else (--no-progress)
    assert 0 < CacheStore.open(out).done_mask().sum() < CacheStore.open(out).n_rows  # stopped in the middle
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "YOLO_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_store(built_cache, out)
    assert_clean(out)


# ---------------------------------------------------------------------------------------------------- trainers
@pytest.mark.slow
@pytest.mark.parametrize("group,workers", [(False, 0), (True, 2)], ids=["kill", "slurm-workers"])
def test_stopped_training_keeps_its_epochs_and_resume_finishes_them(group, workers, voc_yaml, tmp_path):
    project = tmp_path / "runs"
    args = ["train", "--data", str(voc_yaml), "--project", str(project), "--name", "x", *COMMON]
    args[args.index("--epochs") + 1] = "3"
    last = project / "x" / "weights" / "last.pt"
    proc = started([sys.executable, "-m", "atcache", *args], ATCACHE_TEST_TRAIN_WORKERS=str(workers))
    _, stderr = stop_when(proc, last.is_file, signal.SIGTERM, group)  # last.pt appears whole (renamed into place)
    assert proc.returncode == 143, stderr[-3000:]
    line = the_line(stderr)
    n = torch.load(last, weights_only=False)["epoch"] + 1  # the file loads; the epochs it holds
    assert 1 <= n < 3
    kept = "epoch 1 is" if n == 1 else f"epochs 1-{n} are"
    assert line == (f"atcache: stopped by SIGTERM; {kept} kept in {last}: continue with atcache train ... "
                    f"resume={last} (the same options)")
    again = invoke(*args, f"resume={last}")
    assert again.exit_code == 0, again.output[-3000:]
    with open(project / "x" / "results.csv") as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2, 3]
