"""The command of a copy a node runs itself (``peer_ssh``) and how its end is read, without
a cluster (the copies themselves are in test_peer_ssh.py)."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from imagesync.config import Node
from imagesync.errors import RefusedReference
from imagesync.peerssh import _ended
from imagesync.runtimes import IMPORT_MARKER, WRONG_DIGEST
from imagesync.runtimes.peercopy import (
    EXPORT_FAILED,
    NOT_HELD,
    OTHER_DIGEST,
    PEER_MARKER,
    peer_address,
    peer_copy_command,
)

REF = "reg.local:5000/bcm11/app:1"
DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def script_of(command: str) -> str:
    """The script a node-side ``timeout ... sh -c SCRIPT`` runs."""
    words = shlex.split(command)
    assert words[:3] == ["timeout", "-k", "5"] and words[4:6] == ["sh", "-c"], words
    return words[6]


def ssh_words(script: str) -> list[str]:
    """The words of the ``ssh`` command in ``script``, as the shell splits them."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    start = words.index("ssh")
    return words[start:words.index(";", start)]


def test_the_holder_is_reached_as_its_table_says_and_every_value_is_quoted():
    holder = Node(name="n1", host="n1.example", port=2222, user="admin", peer_host="10.0.0.1;$(id)")
    target = Node(name="n2")
    command = peer_copy_command(holder, target, REF, DIGEST, 60, "linux/amd64", 7.5)
    words = ssh_words(script_of(command))
    assert words[:4] == ["ssh", "-n", "-T", "-o"]
    for option in ("BatchMode=yes", "ForwardAgent=no", "ClearAllForwardings=yes", "ConnectTimeout=8"):
        assert option in words
    assert words[words.index("-p") + 1] == "2222" and words[words.index("-l") + 1] == "admin"
    # the host after --, whole, whatever it holds; then the holder's export, one word
    at = words.index("--")
    assert words[at + 1] == "10.0.0.1;$(id)"
    export = words[at + 2]
    assert script_of(export).startswith('echo "imagesync-export ')
    assert f"images export --platform linux/amd64 - {REF}" in script_of(export)
    assert "StrictHostKeyChecking" not in command  # the node's own SSH config decides
    subprocess.run(["sh", "-n", "-c", script_of(command)], check=True)  # the shell can read it


def test_a_holder_without_peer_settings_is_reached_at_its_host_and_whatever_its_table_sets():
    assert peer_address(Node(name="n1")).describe() == "n1"
    assert peer_address(Node(name="n1", host="10.0.0.1", port=22)).describe() == "10.0.0.1:22"
    node = Node(name="n1", host="bmc-n1", user="root", peer_host="n1.cluster", peer_port=2200, peer_user="sync")
    assert peer_address(node).describe() == "sync@n1.cluster:2200"


def test_a_bad_reference_or_digest_never_reaches_the_node():
    holder, target = Node(name="n1"), Node(name="n2")
    with pytest.raises(RefusedReference):
        peer_copy_command(holder, target, "reg.local:5000/x:1;rm -rf /", None, 60, None, 5)
    with pytest.raises(RefusedReference):
        peer_copy_command(holder, target, REF, "sha256:$(id)", 60, None, 5)


@pytest.mark.parametrize(("status", "output", "stderr", "reason"), [
    (0, f"{PEER_MARKER} held {DIGEST}\n{IMPORT_MARKER} 0 - {DIGEST} 0\n{PEER_MARKER} export 0\n", "", ""),
    (NOT_HELD, f"{PEER_MARKER} held -\n{PEER_MARKER} export 141\n", "", f"n1 no longer holds {REF}"),
    (OTHER_DIGEST, f"{PEER_MARKER} held {OTHER}\n{PEER_MARKER} export 141\n", "",
     f"n1 now holds {REF} as {OTHER}, not {DIGEST} as planned"),
    (EXPORT_FAILED, f"{PEER_MARKER} export 255\n", "ssh: connect to host h port 22: Connection refused\n",
     "n2 cannot reach n1 (n1) with its ssh: ssh: connect to host h port 22: Connection refused"),
    (EXPORT_FAILED, f"{PEER_MARKER} export 127\n", "sh: 1: ssh: not found\n",
     "n2 could not run the export on n1 with its ssh (a command not found): sh: 1: ssh: not found"),
    (EXPORT_FAILED, f"{PEER_MARKER} export 1\n", "ctr: failed to dial\n",
     "the export on n1 failed (exit 1): ctr: failed to dial"),
    (WRONG_DIGEST, f"{PEER_MARKER} held {DIGEST}\n{IMPORT_MARKER} 0 - {OTHER} 1\n{PEER_MARKER} export 0\n", "",
     f"the image arrived on n2 as {OTHER}, not as the source's digest (what it left under the name was removed)"),
    (1, f"{PEER_MARKER} held {DIGEST}\n{IMPORT_MARKER} 1 - - 0\n{PEER_MARKER} export 255\n", "unexpected EOF\n",
     "the export on n1 ended without an exit status: the connection dropped or the node killed it; "
     "the import on n2 failed (exit 1): unexpected EOF"),
], ids=["ok", "not-held", "other-digest", "unreachable", "no-ssh", "export-failed", "wrong-digest", "cut"])
def test_how_a_copy_ended_is_read_from_its_status_and_markers(status, output, stderr, reason):
    copied = _ended(Node(name="n1"), Node(name="n2"), REF, DIGEST, status, output, stderr)
    assert copied.ok == (status == 0)
    assert copied.reason == reason
