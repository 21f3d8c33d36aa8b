"""The quick start's per-step losses, recorded before the recipe moved out of the package.

Restructuring must not change what a user gets: ``python -m longlora_tune.quickstart.demo`` (tiny Llama 2, 40
steps,
one CPU process) must reproduce these losses. They were recorded from main at 661200f (the recipe still
inside ``longlora_tune/recipes/``) with ``python -m longlora_tune.quickstart.demo --workdir /tmp/golden``.
"""

from __future__ import annotations

import re

import pytest

from longlora_tune.quickstart import demo

GOLDEN_LOSSES = [
    6.293192545572917,
    6.2861863080193014,
    6.225415278416054,
    6.154873477711397,
    6.041842232498468,
    5.979003307866115,
    5.895153210209865,
    5.8317912980621935,
    5.750003231272978,
    5.708385632084865,
    5.681288296568628,
    5.6369399126838236,
    5.614340628829657,
    5.600005864162071,
    5.618635589001226,
    5.576572552849265,
    5.557818364162071,
    5.544775510301777,
    5.564725030637255,
    5.520717845243566,
    5.481500603170955,
    5.473522590188419,
    5.403627283432904,
    5.365360155292586,
    5.342639040479473,
    5.290416403377757,
    5.257804481655944,
    5.224581490310968,
    5.222856828278187,
    5.156321327359069,
    5.128724580652573,
    5.088145057827819,
    5.060083606196385,
    5.001875335094976,
    4.972271010454963,
    4.946252321729473,
    4.905976658241421,
    4.8734731636795345,
    4.847573792700674,
    4.817781336167279,
]


@pytest.mark.slow
def test_demo_reproduces_the_recorded_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert demo.main(["--workdir", str(tmp_path)]) == 0
    (log,) = (tmp_path / "out" / "logs").glob("*.txt")
    losses = [float(x) for x in re.findall(r"^Step \d+ \| loss:(\S+)", log.read_text(), flags=re.M)]
    assert len(losses) == len(GOLDEN_LOSSES) == 40
    # Same machine, same torch, one thread: the run is deterministic; measured max |diff| 0.0.
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-6, abs=0)
