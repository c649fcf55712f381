"""train-from-cache under DDP, as far as a CPU-only machine can check it.

- ultralytics' own launcher (`--device 0,1,2,3`) pickles the trainer class by reference and each worker rebuilds
  atcache's settings from ATCACHE_TRAIN_SETTINGS;
- a real 2-process torch.distributed run on the CPU (gloo) of AtcacheTrainer from the cache, once as one node with
  two ranks and once as two "nodes" with one rank each: every rank loads the same cache, the DistributedSampler
  partitions the images by global rank, gradients are all-reduced (identical weights on every rank), rank 0 writes
  the results. ultralytics only does DDP on CUDA, so the worker (this file run by torchrun) swaps in gloo and a CPU
  DistributedDataParallel; the rest is ultralytics' and atcache's code as is;
- the world ultralytics hands init_process_group when torchrun starts rank 5 of 8 (2 nodes x 4 GPUs).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickletools
import socket
import subprocess
import sys
import zipfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
OUT_ENV, OVERRIDES_ENV = "ATCACHE_DDP_TEST_OUT", "ATCACHE_DDP_TEST_OVERRIDES"


def _env(**extra) -> dict:
    """The children's environment: atcache importable from this checkout, ultralytics offline and quiet."""
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    return {**os.environ, "PYTHONPATH": path, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(cache: Path):
    from helpers import TEST_LAYERS

    from atcache.train.trainer import DistillSettings

    return DistillSettings(mode="cache", cache=str(cache), layers=tuple((i, i) for i in TEST_LAYERS), at_weight=0.5)


# ---------------------------------------------------------------------- ultralytics' own launcher (one node)
def test_ultralytics_ddp_file_rebuilds_atcache_trainer_and_settings(voc_yaml, built_cache, tmp_path, monkeypatch):
    """generate_ddp_file (what `--device 0,1,2,3` runs under torch.distributed.run) for an AtcacheTrainer: the
    pickled state names atcache.train.trainer.AtcacheTrainer by reference, the script keeps this process' sys.path, and a
    process that only inherits the environment `train()` launches it with rebuilds the trainer with the same
    DistillSettings."""
    from helpers import TEST_IMGSZ
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.dist import generate_ddp_file

    from atcache.train.trainer import SETTINGS_ENV, AtcacheTrainer

    settings = _settings(built_cache)
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "device": "cpu", "plots": False, "workers": 0, "project": str(tmp_path), "name": "ddp"}
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    assert SETTINGS_ENV not in os.environ  # making a trainer leaves the environment alone
    launched = {}
    monkeypatch.setattr(DetectionTrainer, "train", lambda self: launched.update(env=os.environ.get(SETTINGS_ENV)))
    trainer.train()  # where ultralytics launches its DDP workers
    assert launched["env"] == settings.to_json()  # set in the launching process, inherited by the workers
    assert SETTINGS_ENV not in os.environ  # and taken back afterwards
    file = Path(generate_ddp_file(trainer))
    state = file.with_suffix(".pt")
    try:
        script = file.read_text()
        assert 'state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])' in script
        assert repr(sys.path) in script  # the workers import atcache from wherever this process did
        with zipfile.ZipFile(state) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        text = io.StringIO()
        pickletools.dis(pkl, text)
        assert "'atcache.train.trainer AtcacheTrainer'" in text.getvalue()  # by reference: importable in every worker
        assert "_make_skeleton_class" not in text.getvalue()  # not pickled by value
        worker = (  # the DDP script's own lines up to trainer.train(), then what the worker now holds
            "from ultralytics.utils import DEFAULT_CFG_DICT\n"
            "from ultralytics.utils.patches import torch_load\n"
            f"state = torch_load({str(state)!r}, map_location='cpu')\n"
            "cfg = DEFAULT_CFG_DICT.copy(); cfg.update(save_dir='')\n"
            "trainer = state['trainer'](cfg=cfg, overrides=state['args'], _callbacks=state['callbacks'])\n"
            "print(type(trainer).__module__, type(trainer).__name__)\n"
            "print(trainer.settings.to_json())\n"
            "print(trainer.save_dir)\n"
        )
        done = subprocess.run([sys.executable, "-c", worker], env=_env(**{SETTINGS_ENV: launched["env"]}),
                              capture_output=True, text=True, timeout=120)
    finally:
        file.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-3000:]
    kind, rebuilt, save_dir = done.stdout.strip().splitlines()[-3:]
    assert kind == "atcache.train.trainer AtcacheTrainer"
    assert rebuilt == settings.to_json()
    assert Path(save_dir) == trainer.save_dir  # the workers write into the launcher's run folder


# ---------------------------------------------------------------------- a real 2-process run on the CPU (gloo)
def _worker() -> None:
    """One rank under torchrun: ultralytics' trainer with gloo on the CPU; writes what this rank saw."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from atcache.yolo import prepare

    prepare()
    from ultralytics.utils.torch_utils import unwrap_model

    from atcache.train.trainer import AtcacheTrainer
    from atcache.yolo.trainer import AdaptedDetectionTrainer

    class CpuDDP(DistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):  # ultralytics passes [device.index], [None] on a CPU
            super().__init__(module, device_ids=None, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP  # ultralytics looks it up as nn.parallel.DistributedDataParallel
    import ultralytics.engine.validator as validator

    # final_eval validates best.pt on every rank on the current CUDA device: keep it on the CPU
    validator.get_torch_device_backend = lambda device_type: SimpleNamespace(current_device=lambda: 0)
    auto_backend = validator.AutoBackend
    validator.AutoBackend = lambda *args, device=None, **kwargs: auto_backend(*args, device=torch.device("cpu"), **kwargs)

    class CpuDdpTrainer(AtcacheTrainer):
        """What ultralytics does for CUDA devices, on the CPU: torchrun's world, gloo."""

        def __init__(self, *args, **kwargs):
            self.seen: list[str] = []
            super().__init__(*args, **kwargs)
            self.world_size = int(os.environ["WORLD_SIZE"])  # ultralytics counts CUDA devices: 0 for 'cpu'

        def join_world(self, world, rank, local_world):  # atcache's torchrun check (CUDA only), skipped on the CPU
            AdaptedDetectionTrainer.join_world(self, world, rank, local_world)

        def _setup_ddp(self):  # ultralytics' part is the CUDA one replaced here; then the adapter's torchrun part
            dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=self.world_size,
                                    timeout=timedelta(seconds=120))
            if self.shares_run_folder:
                self.take_rank0_run_folder()

        def preprocess_batch(self, batch):
            self.seen += list(batch["im_file"])
            return super().preprocess_batch(batch)

    rank = int(os.environ["RANK"])
    out = Path(os.environ[OUT_ENV])
    # like ultralytics' DDP script: the trainer from its args alone, atcache's settings from the environment
    trainer = CpuDdpTrainer(overrides=json.loads(os.environ[OVERRIDES_ENV]))
    trainer.train()
    params = torch.cat([p.detach().flatten() for p in unwrap_model(trainer.model).parameters()])
    torch.save(params, out / f"params{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": int(os.environ["LOCAL_RANK"]),
        "settings": trainer.settings.to_json(), "cache_rows": len(trainer.cache_targets.files),
        "cache_type": type(trainer.cache_targets).__name__, "seen": trainer.seen,
        "sampler": type(trainer.train_loader.sampler).__name__, "dataset": list(trainer.train_loader.dataset.im_files),
        "save_dir": str(trainer.save_dir),
    }))
    dist.destroy_process_group()


def _torchrun(nodes: int, per_node: int, out: Path, settings, overrides: dict, cwd: Path) -> None:
    from atcache.train.trainer import SETTINGS_ENV

    env = _env(**{SETTINGS_ENV: settings.to_json(), OUT_ENV: str(out), OVERRIDES_ENV: json.dumps(overrides),
                  "YOLO_CONFIG_DIR": str(out / "yolo")})
    port = _free_port()
    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank",
                          str(node), "--nproc-per-node", str(per_node), "--master-addr", "127.0.0.1",
                          "--master-port", str(port), str(Path(__file__).resolve())],
                         env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(nodes)
    ]
    logs = [a.communicate(timeout=240)[0] for a in agents]
    for agent, log in zip(agents, logs):
        assert agent.returncode == 0, log[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 1)], ids=["1node-2ranks", "2nodes-1rank"])
def test_gloo_ddp_run_from_the_cache(voc_yaml, built_cache, tmp_path, nodes, per_node):
    from helpers import TEST_IMGSZ

    settings = _settings(built_cache)
    project = tmp_path / "runs"
    earlier = project / "ddp"  # an earlier run of the same name: ranks > 0 must leave it alone
    earlier.mkdir(parents=True)
    (earlier / "results.csv").write_text("epoch\n1\n")
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "nbs": 4, "device": "cpu", "amp": False, "plots": False, "workers": 0, "project": str(project),
                 "name": "ddp"}
    _torchrun(nodes, per_node, tmp_path, settings, overrides, cwd=tmp_path)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]
    assert [r["local_rank"] for r in reports] == ([0, 1] if per_node == 2 else [0, 0])
    for r in reports:  # every rank rebuilt the settings and holds the whole cache in its own RAM
        assert r["settings"] == settings.to_json()
        assert r["cache_type"] == "CacheTargets" and r["cache_rows"] == len(r["dataset"])
        assert r["sampler"] == "DistributedSampler"
    everything = set(reports[0]["dataset"])
    halves = [set(r["seen"]) for r in reports]
    assert halves[0] | halves[1] == everything  # the sampler partitions the epoch by global rank ...
    assert len(halves[0] & halves[1]) <= len(everything) % 2  # ... up to its padding to equal shares
    assert all(len(r["seen"]) == math.ceil(len(everything) / 2) for r in reports)

    import torch

    p0, p1 = (torch.load(tmp_path / f"params{r}.pt") for r in range(2))
    assert torch.equal(p0, p1)  # all-reduced gradients: the same weights on both ranks

    run = Path(reports[0]["save_dir"])
    assert run == project / "ddp-2"  # rank 0 names the run as ultralytics does
    assert reports[1]["save_dir"] == str(run)  # and every rank uses it (final_eval reads best.pt on every rank)
    with open(run / "results.csv") as f:
        row = {k.strip(): float(v) for k, v in list(csv.DictReader(f))[-1].items()}
    assert math.isfinite(row["train/at_loss"]) and row["train/at_loss"] > 0
    assert (run / "weights" / "best.pt").is_file()
    assert (earlier / "results.csv").read_text() == "epoch\n1\n", "a rank > 0 deleted an earlier run's results"


# ---------------------------------------------------------------------- several nodes: the world torchrun sets
_WORLD_PROBE = """
import json, sys
from atcache.yolo import prepare; prepare()
import torch
import ultralytics.engine.trainer as T
T.select_device = lambda *a, **k: torch.device("cuda", 0)  # a CUDA node, as far as the trainer can tell
class Backend:
    def set_device(self, index): pass
T.get_torch_device_backend = lambda device: Backend()
seen = {}
T.dist.init_process_group = lambda **kw: seen.update(kw)
T.dist.get_world_size = lambda *a: seen["world_size"]
T.dist.broadcast_object_list = lambda objects, src=0: objects.__setitem__(0, sys.argv[2])  # rank 0's run folder
T.dist.all_gather_object = lambda out, obj: out.__setitem__(slice(None), [obj] * len(out))
from atcache.errors import AtcacheError
from atcache.train.trainer import AtcacheTrainer
overrides = json.loads(sys.argv[1])
try:
    t = AtcacheTrainer(overrides=overrides)
except AtcacheError as e:
    print(json.dumps({"error": str(e)})); raise SystemExit
t._setup_ddp()
print(json.dumps({"world_size": t.world_size, "spawns": t.ddp, "device": str(t.device), "rank": seen["rank"],
                  "init_world_size": seen["world_size"], "batch_per_rank": t.batch_size // t.world_size,
                  "save_dir": str(t.save_dir)}))
"""


def _probe(device: str, voc_yaml, built_cache, tmp_path, save_dir: str = "", **torchrun_env) -> dict:
    from helpers import TEST_IMGSZ

    from atcache.train.trainer import SETTINGS_ENV

    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "imgsz": TEST_IMGSZ, "batch": 64, "device": device,
                 "project": str(tmp_path), "name": "probe"}
    env = _env(**{SETTINGS_ENV: _settings(built_cache).to_json(), "YOLO_CONFIG_DIR": str(tmp_path / "yolo")},
               **torchrun_env)
    if save_dir:
        overrides["save_dir"] = save_dir
    rank0 = tmp_path / "rank0-run"
    (rank0 / "weights").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _WORLD_PROBE, json.dumps(overrides), str(rank0)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torchrun_several_nodes_gets_the_global_world(voc_yaml, built_cache, tmp_path):
    """Rank 5 of 8 (node 1 of 2, four GPUs each, `torchrun --nnodes 2 --nproc-per-node 4`): init_process_group must get
    rank 5 of world 8, the batch is split over 8 ranks, and ranks > 0 do not take the run folder's name."""
    torchrun = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    got = _probe("0,1,2,3", voc_yaml, built_cache, tmp_path, **torchrun)
    assert got["device"] == "cuda:1" and not got["spawns"]
    assert (got["rank"], got["init_world_size"], got["world_size"]) == (5, 8, 8)
    assert got["batch_per_rank"] == 64 // 8
    assert got["save_dir"] == str(tmp_path / "rank0-run")  # rank 0's run folder, not its own pick of `name`
    # one GPU per node (`--nproc-per-node 1 --device 0`): still DDP over all nodes
    one = _probe("0", voc_yaml, built_cache, tmp_path, WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    assert (one["rank"], one["init_world_size"]) == (1, 2)
    # --device must name one GPU per local process, and the CPU is refused in one line
    assert "names 2 devices" in _probe("0,1", voc_yaml, built_cache, tmp_path, **torchrun)["error"]
    assert "CUDA devices only" in _probe("cpu", voc_yaml, built_cache, tmp_path, **torchrun)["error"]


def test_ultralytics_launcher_world_is_unchanged(voc_yaml, built_cache, tmp_path):
    """Rank 2 of ultralytics' own single-node launch (`--device 0,1,2,3`): rank 2 of world 4, as before."""
    run = str(tmp_path / "launcher-run")  # the launcher's save_dir travels in the workers' args
    got = _probe("0,1,2,3", voc_yaml, built_cache, tmp_path, save_dir=run,
                 WORLD_SIZE="4", RANK="2", LOCAL_RANK="2", LOCAL_WORLD_SIZE="4")
    assert (got["device"], got["rank"], got["init_world_size"], got["batch_per_rank"]) == ("cuda:2", 2, 4, 16)
    assert got["save_dir"] == run


if __name__ == "__main__":  # a rank started by torchrun in test_gloo_ddp_run_from_the_cache
    _worker()
