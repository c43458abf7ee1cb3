"""`dsla bench serve` pieces the peer runs rely on: --extra-body, the request body, the server's
process tree. Pure logic: no server, no network."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from dsla.bench import serve


def parse(argv):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(argv)


def test_extra_body_is_merged_into_every_request():
    args = parse(["--extra-body", '{"logit_bias": {"2": -100}, "temperature": 0.5}'])
    body = serve.request_payload("m", "hi", 7, args.extra_body)
    assert body["logit_bias"] == {"2": -100} and body["temperature"] == 0.5  # added and overridden
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["stream"] is True
    assert serve.request_payload("m", "hi", 7) == serve.request_payload("m", "hi", 7, None)


@pytest.mark.parametrize("text, match", [("{nope", "not JSON"), ("[1, 2]", "JSON object")])
def test_extra_body_rejects_what_is_not_an_object(text, match, capsys):
    with pytest.raises(SystemExit):
        parse(["--extra-body", text])
    assert match in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_server_memory_and_cpu_include_children():
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):  # until the child exists
            if len(serve.process_tree(parent.pid)) == 2:
                break
            time.sleep(0.05)
        tree = serve.process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
        assert serve.server_rss_mb(parent.pid) > serve._rss_mb(parent.pid)
        assert serve.server_cpu_s(parent.pid) >= serve._cpu_s(parent.pid)
    finally:
        for pid in serve.process_tree(parent.pid)[1:]:
            os.kill(pid, 9)
        parent.kill()
        parent.wait()
    assert serve.server_rss_mb(parent.pid) is None and serve.server_cpu_s(None) is None
