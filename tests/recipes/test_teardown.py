"""A finished run frees its process group's backend before the interpreter shuts down.

gloo's worker threads still running at interpreter shutdown can abort a run that finished (SIGABRT,
"terminate called without an active exception"; seen once in CI on a 2-process run). torch.distributed's
caches keep FSDP2's meshes, and so the group, after ``destroy_process_group``; the recipe's teardown
(``longlora_tune.training.distributed.close_process_group``) drops them. Each rank here runs the recipe
script as ``tune run`` does, then lists its own threads: none of the group's may be left.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_runner import CONFIGS, RECIPE

from longlora_tune.quickstart import tiny
from longlora_tune.training.distributed import close_process_group, init_process_group, resolve_device

REPO = Path(__file__).resolve().parents[2]

# The names torch gives gloo's threads: the backend's work loop (started with the group) and the TCP
# transport's event loop (started on its first connection, so not always there at once). A new thread
# names itself once it runs: the rank script waits for the work loop's name.
WORK_LOOP = "pt_gloo_runloop"
GLOO_THREADS = {WORK_LOOP, "gloo_tcp_loop"}

# Runs the recipe in this rank's process, then records the threads left; a new one-rank gloo group then
# shows that this torch still names its threads so (the check would pass vacuously otherwise).
_RANK_SCRIPT = """
import json, os, runpy, sys, time
import torch.distributed as dist

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

out, recipe, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [recipe, *argv]
try:
    runpy.run_path(recipe, run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
after_run = threads()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
deadline = time.monotonic() + 10
while "pt_gloo_runloop" not in threads() and time.monotonic() < deadline:
    time.sleep(0.05)  # a new thread names itself once it runs
with_a_group = threads()
dist.destroy_process_group()
rank = os.environ.get("RANK", "0")
with open(os.path.join(out, f"threads_{rank}.json"), "w") as f:
    json.dump({"after_run": after_run, "with_a_group": with_a_group}, f)
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teardown")
    script = root / "rank.py"
    script.write_text(_RANK_SCRIPT)
    return {
        "base": tiny.make_hf_checkpoint(root / "base"),
        "corpus": tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24),
        "cache": root / "cache",
        "script": script,
    }


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc (Linux)")
@pytest.mark.parametrize(("nproc", "cp_degree"), [(1, 1), (2, 1), (2, 2)], ids=["1rank", "2dp", "2cp"])
def test_no_gloo_thread_outlives_a_finished_run(assets, tmp_path, nproc, cp_degree):
    overrides = [
        f"checkpoint_dir={assets['base']}",
        f"dataset.data_files={assets['corpus']}",
        f"dataset.cache_dir={assets['cache']}",
        f"output_dir={tmp_path / 'out'}",
        "max_steps=2",
        "save_every_n_steps=2",
        "export_formats=[peft]",
        f"context_parallel_degree={cp_degree}",  # 2: the context-parallel group as well
    ]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *launcher,
        str(assets["script"]),
        str(tmp_path),
        str(RECIPE),
        "--config",
        str(CONFIGS / "tiny_demo.yaml"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for rank in range(nproc):
        seen = json.loads((tmp_path / f"threads_{rank}.json").read_text())
        assert WORK_LOOP in seen["with_a_group"], seen["with_a_group"]
        assert not GLOO_THREADS & set(seen["after_run"]), f"rank {rank}: {seen['after_run']}"


def test_closing_the_group_leaves_other_caches_alone_even_one_made_by_exec():
    # Only torch.distributed's caches are emptied; a function made by exec() has __module__ None.
    namespace: dict = {}
    exec("def double(x):\n    return 2 * x", namespace)
    cached = functools.lru_cache(namespace["double"])
    cached(3)
    assert cached.__module__ is None
    close_process_group(init_process_group(resolve_device("cpu"), solo_group=True))
    assert cached.cache_info().currsize == 1
