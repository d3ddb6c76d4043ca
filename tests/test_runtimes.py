import json
import shlex
from pathlib import Path

import pytest

from imagesync import runtimes
from imagesync.budgets import KILL_AFTER
from imagesync.errors import RefusedReference

DATA = Path(__file__).parent / "data"


def test_parses_crictl_images_json():
    images = runtimes.Crictl().parse_list((DATA / "crictl-images.json").read_text())
    assert len(images) == 4
    pytorch = images[0]
    assert pytorch.tags == ("nvcr.io/nvidia/pytorch:24.01-py3",)
    assert pytorch.digests[0].startswith("nvcr.io/nvidia/pytorch@sha256:0b2f")
    assert pytorch.size == 9883452311
    assert images[1].pinned
    assert images[3].tags == ()


def test_crictl_empty_and_garbage_output():
    assert runtimes.Crictl().parse_list('{"images": []}') == []
    assert runtimes.Crictl().parse_list("") == []
    with pytest.raises(ValueError, match="not JSON"):
        runtimes.Crictl().parse_list("FATA[0000] connect: connection refused")


def test_parses_ctr_images_ls_grouping_rows_by_digest():
    images = runtimes.Ctr().parse_list((DATA / "ctr-images-ls.txt").read_text())
    by_id = {image.id: image for image in images}
    busybox = by_id["sha256:9ae97d36d26566ff84e8893c64a6dc4fe8ca6d1144bf5b87b2b85a32def253c7"]
    assert busybox.tags == ("docker.io/library/busybox:1.36",)
    assert busybox.digests == (
        "docker.io/library/busybox@sha256:9ae97d36d26566ff84e8893c64a6dc4fe8ca6d1144bf5b87b2b85a32def253c7",
    )
    assert busybox.size == int(2.1 * 1024**2)
    pytorch = by_id["sha256:0b2f6a5b2e4c2e5dd5f8a9d1d3fbb0ce0ba0e1c2b5a2c2f9e1b8b9c1d4e7f6a1"]
    assert pytorch.tags == ("nvcr.io/nvidia/pytorch:24.01-py3",)
    assert pytorch.digests == ("nvcr.io/nvidia/pytorch@" + pytorch.id,)


def test_pull_commands_run_under_the_nodes_timeout_and_quote_the_reference():
    command = runtimes.Crictl("unix:///run/k3s/containerd.sock").pull_command("nvcr.io/nvidia/pytorch:24.01-py3", 1800)
    words = shlex.split(command.command)
    assert words[:5] == ["timeout", "-k", str(KILL_AFTER), "1800", "crictl"]
    assert words[-2:] == ["pull", "nvcr.io/nvidia/pytorch:24.01-py3"]
    ctr = runtimes.Ctr("/run/containerd/containerd.sock", "k8s.io", "/etc/containerd/certs.d")
    words = shlex.split(ctr.pull_command("nginx", 60).command)
    assert words[4:] == ["ctr", "--address", "/run/containerd/containerd.sock", "--namespace", "k8s.io",
                         "images", "pull", "--hosts-dir", "/etc/containerd/certs.d", "nginx"]


@pytest.mark.parametrize("evil", ["nginx; touch /tmp/x", "$(touch /tmp/x)", "a\nb", "`id`"])
def test_pull_command_refuses_invalid_references(evil):
    for runtime in (runtimes.Crictl(), runtimes.Ctr()):
        with pytest.raises(RefusedReference):
            runtime.pull_command(evil, 60)


@pytest.mark.parametrize(
    "reason, transient",
    [
        ('rpc error: code = NotFound desc = failed to pull and unpack image "x": not found', False),
        ("failed to resolve reference: unexpected status from HEAD request: 401 Unauthorized", False),
        ("pull access denied, repository does not exist", False),
        ("failed to copy: httpReadSeeker: failed open: unexpected status code 503 Service Unavailable", True),
        ("dial tcp 127.0.0.1:5000: connect: connection refused", True),
        ("read tcp 127.0.0.1:4000->127.0.0.1:5000: read: connection reset by peer", True),
        ("write /var/lib/containerd/x: no space left on device", False),
        ("something nobody has seen", False),
        ('rpc error: code = Unavailable desc = connection error: dial unix /run/containerd/containerd.sock', True),
    ],
)
def test_failure_classification(reason, transient):
    assert runtimes.is_transient(reason) is transient


def test_failure_reason_strips_log_noise():
    stderr = (
        'E1122 10:00:00.000000   1234 remote_image.go:171] "PullImage from image service failed"\n'
        'time="2026-11-22T10:00:00Z" level=fatal '
        'msg="pulling image: rpc error: code = NotFound desc = not found"\n'
    )
    assert runtimes.failure_reason(stderr) == "pulling image: rpc error: code = NotFound desc = not found"


def test_both_runtimes_agree_on_a_containerd_nodes_images():
    """The same node, listed through the CRI (crictl's JSON) and by ctr (containerd 1.6)."""
    from imagesync.planning.holdings import holdings

    crictl = runtimes.Crictl().parse_list((DATA / "crictl-images-containerd.json").read_text())
    ctr = runtimes.Ctr().parse_list((DATA / "ctr-images-ls-containerd.txt").read_text())
    prefixes = ["127.0.0.1:14161/bcm11", "127.0.0.1:14161/nvidia"]
    via_cri = holdings("n", crictl, prefixes).references
    via_ctr = holdings("n", ctr, prefixes).references
    assert via_cri == via_ctr
    assert via_cri["127.0.0.1:14161/bcm11/hpc/app:1"] == (
        "sha256:a550da9ae25406b668cb0484b0ee463ec9811d74acbd9f0453f44a7e1c9c9a45")
    # the untagged image is held by its digest
    untagged = "127.0.0.1:14161/nvidia/triton@sha256:61c875ca16a5a9c947b1bdbfc0bb70efa95fcebff5c551846dee591481265c6e"
    assert untagged in via_cri
    assert len(via_cri) == 3


def test_a_registry_login_goes_to_the_runtime_quoted():
    login = ("$oauthtoken", "key with 'quotes' $(and) spaces")
    words = shlex.split(runtimes.Crictl().pull_command("nvcr.io/nvidia/a:1", 60, login).command)
    assert words[words.index("--creds") + 1] == "$oauthtoken:key with 'quotes' $(and) spaces"
    words = shlex.split(runtimes.Ctr().pull_command("nvcr.io/nvidia/a:1", 60, login).command)
    assert words[words.index("--user") + 1] == "$oauthtoken:key with 'quotes' $(and) spaces"
    assert "--creds" not in runtimes.Crictl().pull_command("nvcr.io/nvidia/a:1", 60).command


def test_an_unchecked_pull_is_the_pull_alone():
    for runtime in (runtimes.Crictl(), runtimes.Ctr()):
        words = shlex.split(runtime.pull_command("nvcr.io/nvidia/a:1", 60).command)
        assert words[:4] == ["timeout", "-k", "5", "60"]
        assert "sh" not in words and "inspecti" not in words and "ls" not in words


def _fake_runtime(bin_dir, name, holds):
    """A stand-in crictl/ctr on PATH: answers presence for ``holds``, logs every pull."""
    log = bin_dir / "calls.log"
    script = bin_dir / name
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *"inspecti -q {holds}"*) exit 0 ;;
  *inspecti*) echo 'no such image present' >&2; exit 1 ;;
  *"ls -q name=={holds}"*) echo '{holds}'; exit 0 ;;
  *" ls -q "*) exit 0 ;;
  *pull*) echo "pulled $*"; exit 0 ;;
esac
exit 2
""")
    script.chmod(0o755)
    return log


@pytest.mark.parametrize("name", ["crictl", "ctr"])
def test_a_checked_pull_asks_then_pulls_in_one_node_side_command(tmp_path, name):
    from imagesync.transport import LocalTransport

    held, lacking = "nvcr.io/nvidia/a:1", "nvcr.io/nvidia/b:1"
    log = _fake_runtime(tmp_path, name, held)
    node = LocalTransport("n", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    runtime = runtimes.Crictl() if name == "crictl" else runtimes.Ctr()

    present = node.run(runtime.pull_command(held, 30, check=True).command, timeout=30)
    assert runtimes.found_present(present), present
    assert "pull" not in log.read_text()

    pulled = node.run(runtime.pull_command(lacking, 30, ("u", "it's $(secret)"), check=True).command, timeout=30)
    assert pulled.ok and not runtimes.found_present(pulled), pulled
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and "pull" in calls[-1] and lacking in calls[-1]
    assert "it's $(secret)" in calls[-1]  # quoted through both shells, never expanded


def test_a_checked_pull_refuses_invalid_references():
    for runtime in (runtimes.Crictl(), runtimes.Ctr()):
        with pytest.raises(RefusedReference):
            runtime.pull_command("a;b", 60, check=True)


@pytest.mark.parametrize("evil", ["$(touch /tmp/x)", "sha256:`id`", "sha256:abc; reboot", "sha256:" + "a" * 64 + "\n"])
def test_restore_command_refuses_a_digest_outside_the_grammar(evil):
    with pytest.raises(RefusedReference, match="not a content digest"):
        runtimes.Ctr().restore_command("bk.local/reg.local/a:1", "reg.local/a:1", 30, evil)


@pytest.mark.parametrize("evil", ["nginx; touch /tmp/x", "$(touch /tmp/x)", "a\nb", "`id`"])
def test_every_ctr_line_refuses_invalid_references(evil):
    ctr = runtimes.Ctr()
    for build in (lambda: ctr.restore_command("bk.local/a:1", evil, 30),
                  lambda: ctr.restore_command(evil, "reg.local/a:1", 30),
                  lambda: ctr.push_command("bk.local/a:1", evil, 30),
                  lambda: ctr.pull_command("reg.local/a:1", 30, also_as=evil),
                  lambda: ctr.presence_command(evil, 30),
                  lambda: ctr.export_command(evil, 30),
                  lambda: ctr.import_command(evil, "sha256:" + "a" * 64, 30)):
        with pytest.raises(RefusedReference):
            build()


def test_a_restore_line_holds_every_value_quoted():
    """The digest reaches the shell only as a quoted word, and the message names it through a variable."""
    digest = "sha256:" + "b" * 64
    line = runtimes.Ctr("/run/k.sock").restore_command("bk.local/reg.local/a:1", "reg.local/a:1", 30, digest)
    script = shlex.split(line)[-1]
    assert f"want={digest};" in script or f"want='{digest}'" in script
    assert "($want)" in script and f"({digest})" not in script


def test_every_ctr_line_of_a_copy_runs_whole_under_the_nodes_timeout():
    """The digest checks and the clean-up too: a hung containerd must not keep them on the node."""
    ctr, ref = runtimes.Ctr(), "reg.local/a:1"
    lines = {"presence": ctr.presence_command(ref, 30), "export": ctr.export_command(ref, 30),
             "import": ctr.import_command(ref, "sha256:" + "a" * 64, 30)}
    for what, line in lines.items():
        words = shlex.split(line)
        assert words[:3] == ["timeout", "-k", str(KILL_AFTER)] and words[4:6] == ["sh", "-c"], what
    assert shlex.split(lines["import"])[3] == str(30 + KILL_AFTER)  # the checks after the import's own 30 s


# -- prune's commands (runtimes/removal.py) ---------------------------------------------------------

ID = "sha256:" + "c" * 64
DIGEST = "sha256:" + "d" * 64
RETIRED = runtimes.Image(id=ID, tags=("reg.local/app:1",), digests=(f"reg.local/app@{DIGEST}",))
#: crictl ps -a -o json as crictl 1.26 prints it (a kubelet names the image by its id)
CRICTL_PS = {"containers": [{
    "id": "5a1b" + "0" * 60, "podSandboxId": "9f" + "0" * 62, "metadata": {"name": "web", "attempt": 0},
    "image": {"image": ID, "annotations": {}}, "imageRef": ID, "state": "CONTAINER_EXITED",
    "createdAt": "1733300000000000000", "labels": {}, "annotations": {}}]}
CTR_LS = ("CONTAINER    IMAGE                  RUNTIME\n"
          "job-1        reg.local/other:2      io.containerd.runc.v2\n")


def _node(runtime="crictl"):
    from imagesync.config import Node

    return Node(name="n", runtime=runtime)


def test_a_crictl_nodes_containers_are_the_cris_and_ctrs_where_it_answers():
    from imagesync.runtimes import removal

    output = (json.dumps(CRICTL_PS) + f"\n{removal.CONTAINERS_MARKER} crictl 0\n"
              + CTR_LS + f"{removal.CONTAINERS_MARKER} ctr 0\n")
    containers = removal.parse_containers(_node(), output)
    assert containers.using(RETIRED) == ("web (5a1b000000000)",)
    assert containers.using(runtimes.Image(id="sha256:" + "e" * 64, tags=("reg.local/other:2",))) == ("job-1",)
    assert containers.using(runtimes.Image(id="sha256:" + "e" * 64, tags=("reg.local/app:2",))) == ()
    # ctr beside crictl that cannot answer (a CRI-O node with a ctr of no use): crictl's answer stands
    alone = removal.parse_containers(_node(), json.dumps(CRICTL_PS) + f"\n{removal.CONTAINERS_MARKER} crictl 0\n"
                                     f"ctr: connection refused\n{removal.CONTAINERS_MARKER} ctr 1\n")
    assert alone.using(RETIRED)


@pytest.mark.parametrize("runtime, output", [
    ("crictl", "imagesync-containers crictl 1\nCONTAINER IMAGE RUNTIME\nimagesync-containers ctr 0\n"),
    ("crictl", ""),  # killed by timeout before it said anything
    ("ctr", "ctr: failed to dial\nimagesync-containers ctr 1\n"),
    ("crictl", "not json\nimagesync-containers crictl 0\n"),
])
def test_a_node_whose_own_client_cannot_list_its_containers_says_so(runtime, output):
    from imagesync.runtimes import removal

    with pytest.raises(ValueError):
        removal.parse_containers(_node(runtime), output)


def test_a_ctr_container_named_by_the_cris_image_id_keeps_the_image_it_aliases():
    from imagesync.runtimes import removal

    image = runtimes.Ctr().parse_list((DATA / "ctr-images-ls-containerd.txt").read_text())[0]
    assert image.aliases and all(alias.startswith("sha256:") for alias in image.aliases)
    listing = (f"CONTAINER IMAGE RUNTIME\nweb {image.aliases[0]} io.containerd.runc.v2\n"
               f"{removal.CONTAINERS_MARKER} ctr 0\n")
    assert removal.parse_containers(_node("ctr"), listing).using(image) == ("web",)


def _fake_node_runtime(bin_dir, ps_json, ctr_ls, ps_status=0, tags=("reg.local/app:1",)):
    """crictl and ctr stand-ins: they answer ps / containers ls / the image's tags as given and log every call."""
    log = bin_dir / "calls.log"
    (bin_dir / "status.json").write_text(json.dumps({"status": {"id": ID, "repoTags": list(tags)}}, indent=2))
    (bin_dir / "ps.json").write_text(json.dumps(ps_json))
    (bin_dir / "ctr-ls.txt").write_text(ctr_ls)
    for name in ("crictl", "ctr"):
        script = bin_dir / name
        script.write_text(f"""#!/bin/sh
echo "{name} $*" >> {log}
case "$*" in
  *"ps -a -o json"*) cat {bin_dir / 'ps.json'}; exit {ps_status} ;;
  *"containers ls"*) cat {bin_dir / 'ctr-ls.txt'}; exit 0 ;;
  *"inspecti -q"*) cat {bin_dir / 'status.json'}; exit 0 ;;
  "rmi "*|*" rmi "*|*"images rm"*) exit 0 ;;
esac
exit 2
""")
        script.chmod(0o755)
    return log


@pytest.mark.parametrize("runtime", ["crictl", "ctr"])
def test_a_removal_asks_again_and_never_removes_an_image_a_container_uses(tmp_path, runtime):
    from imagesync.runtimes import removal
    from imagesync.transport import LocalTransport

    node = LocalTransport("n", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    used = CTR_LS + "web        reg.local/app:1        io.containerd.runc.v2\n"
    log = _fake_node_runtime(tmp_path, {"containers": []}, used)
    result = node.run(removal.remove_command(_node(runtime), RETIRED, 30), timeout=30)
    assert removal.read_removal(result) == (removal.IN_USE, "reg.local/app:1")
    assert "rmi" not in log.read_text() and "images rm" not in log.read_text()

    log = _fake_node_runtime(tmp_path, {"containers": []}, CTR_LS)
    result = node.run(removal.remove_command(_node(runtime), RETIRED, 30), timeout=30)
    assert removal.read_removal(result) == (removal.REMOVED, "")
    removed = log.read_text().splitlines()[-1]
    if runtime == "crictl":
        assert removed == f"crictl rmi {ID}"  # by id: the CRI takes every name
    else:
        assert removed.endswith(f"images rm reg.local/app:1 reg.local/app@{DIGEST}")


def test_a_crictl_removal_stops_when_the_image_was_given_another_name_since_it_was_judged(tmp_path):
    """The CRI would take the new name with the image: a kubelet's pull of another tag of it, say."""
    from imagesync.runtimes import removal
    from imagesync.transport import LocalTransport

    node = LocalTransport("n", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    log = _fake_node_runtime(tmp_path, {"containers": []}, CTR_LS, tags=("reg.local/app:1", "reg.local/app:new"))
    result = node.run(removal.remove_command(_node("crictl"), RETIRED, 30), timeout=30)
    assert removal.read_removal(result) == (removal.RENAMED, "reg.local/app:new")
    assert "rmi" not in log.read_text()


def test_a_removal_on_a_node_whose_containers_cannot_be_listed_removes_nothing(tmp_path):
    from imagesync.runtimes import removal
    from imagesync.transport import LocalTransport

    node = LocalTransport("n", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    log = _fake_node_runtime(tmp_path, {"containers": []}, CTR_LS, ps_status=1)
    result = node.run(removal.remove_command(_node("crictl"), RETIRED, 30), timeout=30)
    assert removal.read_removal(result) == (removal.UNLISTED, "")
    assert "rmi" not in log.read_text()


@pytest.mark.parametrize("evil", ["reg.local/a:1; reboot", "$(id)", "a\nb"])
def test_removal_lines_run_under_the_nodes_timeout_and_refuse_what_the_grammar_refuses(evil):
    from imagesync.runtimes import removal

    words = shlex.split(removal.containers_command(_node(), 60))
    assert words[:5] == ["timeout", "-k", str(KILL_AFTER), "60", "sh"]
    assert shlex.split(removal.remove_command(_node(), RETIRED, 60))[:4] == ["timeout", "-k", str(KILL_AFTER), "60"]
    with pytest.raises(RefusedReference):
        removal.remove_command(_node("ctr"), runtimes.Image(id=ID, tags=(evil,)), 60)
    with pytest.raises(RefusedReference):
        removal.remove_command(_node("crictl"), runtimes.Image(id=evil, tags=("reg.local/a:1",)), 60)


@pytest.mark.parametrize("name", ["crictl", "ctr"])
def test_a_checked_update_finds_the_tag_present_only_under_the_digest_it_expects(tmp_path, name):
    """A moved tag held under its old digest is pulled again; under the new one it is present."""
    from imagesync.transport import LocalTransport

    old, new = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    log = tmp_path / "calls.log"
    script = tmp_path / name
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *inspecti*|*" ls "*) echo "reg.local/app@{old}"; exit 0 ;;
  *pull*) exit 0 ;;
esac
exit 2
""")
    script.chmod(0o755)
    node = LocalTransport("n", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    runtime = runtimes.Crictl() if name == "crictl" else runtimes.Ctr()
    moved = node.run(runtime.pull_command("reg.local/app:1", 30, check=True, expect=new).command, timeout=30)
    assert moved.ok and not runtimes.found_present(moved) and "pull" in log.read_text()
    held = node.run(runtime.pull_command("reg.local/app:1", 30, check=True, expect=old).command, timeout=30)
    assert runtimes.found_present(held)
    with pytest.raises(RefusedReference):
        runtime.pull_command("reg.local/app:1", 30, check=True, expect="sha256:$(id)")
