"""Stopping a training and continuing it: ultralytics writes weights/last.pt at every epoch's end and continues from it
with `resume=<run>/weights/last.pt`. `ResumableTraining` (a base of AtcacheTrainer, before ultralytics' trainer) makes
those checkpoints safe to stop at any moment and says, when Ctrl-C or SIGTERM stops the run, which epochs last.pt holds
and the command that continues (atcache.errors.Interrupted, printed by the CLI). Where ultralytics writes its
checkpoints is atcache.yolo.trainer's (`checkpoints_written_to`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from atcache.errors import explain_interruption, signals_held
from atcache.yolo.trainer import checkpoints_written_to

COMMAND = {"plain": "train", "cache": "train-from-cache", "online": "train-online"}  # the CLI command of each mode


@contextlib.contextmanager
def written_whole(*paths: Path):
    """Temporary names for `paths`, each renamed into place after the block if it was written, with Ctrl-C and SIGTERM
    held meanwhile: a stop or a kill while writing leaves the previous file, never half of one."""
    partial = [p.with_name(f".{p.name}.partial") for p in paths]
    with signals_held():
        for p in partial:
            p.unlink(missing_ok=True)  # a killed writer's leftover
        yield partial
        for p, path in zip(partial, paths):
            if p.exists():
                os.replace(p, path)


class ResumableTraining:
    """ultralytics' BaseTrainer steps that write or read checkpoints, made safe to interrupt (the attributes are
    BaseTrainer's: last, best, wdir, epoch, epochs, start_epoch, resume, csv, args, ddp; `settings.mode` AtcacheTrainer's)."""

    _kept: tuple[int, Path | None] = (0, None)  # epochs that last.pt holds, and the file (this run's or the resumed one)

    def train(self):
        """ultralytics' training; Ctrl-C or SIGTERM leaves it as Interrupted saying what was kept and how to continue."""
        with explain_interruption(self.interruption):
            return super().train()

    def interruption(self) -> str:
        """What a stop now leaves: the epochs last.pt holds and the command that continues from it."""
        n, last = self._kept
        if not n and self.ddp and self.last.is_file():  # ultralytics' DDP workers wrote it, not this process
            return f"the finished epochs are kept in {self.last}: continue with {self._continue(self.last)}"
        if not n:
            return "no epoch has finished yet, nothing is kept: rerunning the same command starts over"
        if n >= self.epochs:
            return f"training had finished (epochs 1-{n}): best.pt and last.pt in {self.wdir} are kept"
        return f"{'epoch 1 is' if n == 1 else f'epochs 1-{n} are'} kept in {last}: continue with {self._continue(last)}"

    def _continue(self, last) -> str:
        return f"atcache {COMMAND[self.settings.mode]} ... resume={last} (the same options)"

    def save_model(self):
        """ultralytics' last.pt and best.pt, written whole or not at all (`written_whole`; it writes them in place)."""
        with written_whole(self.last, self.best) as partial:
            with checkpoints_written_to(self, *partial):
                saved = super().save_model()
            if saved:
                self._kept = (self.epoch + 1, self.last)
        return saved

    def final_eval(self):
        """ultralytics' final validation, which first rewrites last.pt and best.pt in place without the optimizer
        state: Ctrl-C and SIGTERM wait until it is done, so that neither file can be left half written."""
        with signals_held():
            super().final_eval()

    def resume_training(self, ckpt):
        """ultralytics' resume. results.csv keeps the rows of the checkpoint's epochs only: a stop between an epoch's
        row and its last.pt would otherwise log that epoch twice."""
        super().resume_training(ckpt)
        if ckpt is None or not self.resume:
            return
        self._kept = (self.start_epoch, Path(self.args.resume))
        if int(os.environ.get("RANK", -1)) in (-1, 0) and self.csv.is_file():
            lines = self.csv.read_text().splitlines(keepends=True)
            keep = lines[:1] + [row for row in lines[1:] if row.strip() and float(row.split(",", 1)[0]) <= self.start_epoch]
            if len(keep) < len(lines):
                self.csv.write_text("".join(keep))
