"""Ctrl-C (SIGINT) and SIGTERM in the middle of a real `quantkit convert`: one line, exit 130 / 143,
the temporary output removed at once (not left for the next run), nothing under the final name,
the source untouched. For a single file, a sharded folder and a compressed-tensors folder.

Each signal is sent as the temporary output appears (polled, so it lands there however fast or
slow the machine is: right inside the writer's set-up, between open() creating the file and the
writer holding it) and again 20 ms later, in the middle of the data (or, on a fast machine,
just after the rename: then the output under the final name must be complete).
"""
import os
import signal
import subprocess
import time

import pytest
from runs import OUTPUTS, convert_cmd, llama_like_source, partials, sha256

from quantkit.validation import validate

SIGNALS = {signal.SIGINT: (130, "interrupted: stopped"), signal.SIGTERM: (143, "terminated: stopped")}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return llama_like_source(tmp_path_factory.mktemp("signals-src"))


@pytest.mark.parametrize("delay", [0.0, 0.02])
@pytest.mark.parametrize("sig", list(SIGNALS), ids=lambda s: s.name)
@pytest.mark.parametrize("output", list(OUTPUTS))
def test_signal_mid_write_cleans_up_at_once(source, tmp_path, sig, output, delay):
    name, extra = OUTPUTS[output]
    out = tmp_path / name
    before = sha256(source)
    proc = subprocess.Popen(convert_cmd(source, out, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not partials(tmp_path):
        time.sleep(0.001)
    assert proc.poll() is None, "the conversion ended before its temporary output was seen"
    time.sleep(delay)
    proc.send_signal(sig)
    rc, stderr = proc.wait(), proc.stderr.read()

    code, line = SIGNALS[sig]
    if rc == 0:                      # finished between the poll and the signal: a complete output
        pytest.skip("the conversion finished before the signal arrived")
    assert rc == code, stderr
    assert line in stderr and "Traceback" not in stderr, stderr
    assert partials(tmp_path) == [], "the temporary output must be removed by the interrupted run itself"
    if out.exists():      # the signal came after the rename: the output is complete, and says so
        assert validate(str(out), str(source)).ok
    else:
        assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert sha256(source) == before
