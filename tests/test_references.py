import pytest

from imagesync import references
from imagesync.errors import RefusedReference


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.25", "docker.io/library/nginx:1.25"),
        ("library/nginx", "docker.io/library/nginx:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("index.docker.io/library/nginx", "docker.io/library/nginx:latest"),
        ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3"),
        ("localhost/app", "localhost/app:latest"),
        ("bcm11.cm.cluster:5000/hpc/openfoam:v11", "bcm11.cm.cluster:5000/hpc/openfoam:v11"),
        ("127.0.0.1:5000/bcm11/app:1", "127.0.0.1:5000/bcm11/app:1"),
        (
            "nvcr.io/nvidia/tritonserver@sha256:" + "a" * 64,
            "nvcr.io/nvidia/tritonserver@sha256:" + "a" * 64,
        ),
        ("busybox:1.36@sha256:" + "B" * 64, "docker.io/library/busybox:1.36@sha256:" + "b" * 64),
    ],
)
def test_normalizes_as_the_runtime_does(text, normalized):
    assert references.normalize(text) == normalized


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nginx; touch /tmp/pwned",
        "$(touch /tmp/pwned)",
        "`id`",
        "nginx\ntouch /tmp/x",
        "nginx:latest && rm -rf /",
        "Nginx",
        "docker.io/Library/nginx",
        "nginx:" + "a" * 129,
        "a/" * 200 + "b",
        "nginx@sha256:short",
        "café/app",
        "-rf",
        "nginx:tag with space",
        "repo/../etc",
        "x" * 2000,
    ],
)
def test_refuses_what_is_not_a_reference(text):
    with pytest.raises(RefusedReference):
        references.parse(text)
    assert not references.is_valid(text)


@pytest.mark.parametrize(
    "ref, prefix, expected",
    [
        ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io/nvidia", True),
        ("nvcr.io/nvidiax/pytorch:24.01-py3", "nvcr.io/nvidia", False),
        ("nvcr.io/nvidia:1", "nvcr.io/nvidia", True),
        ("nvcr.io/nvidia/pytorch:24.01", "nvcr.io/nvidia/pytorch", True),
        ("nvcr.io/nvidia/pytorch-lite:1", "nvcr.io/nvidia/pytorch", False),
        ("bcm11/project/app:1", "bcm11", True),
        ("docker.io/bcm11/app:1", "bcm11", True),
        ("bcm11x/app:1", "bcm11", False),
        ("bcm11.cm.cluster:5000/hpc/app:1", "bcm11.cm.cluster:5000", True),
        ("bcm11.cm.cluster:5000/hpc/app:1", "bcm11", False),
        ("nginx", "docker.io/library", True),
        ("nginx", "nginx", True),
    ],
)
def test_prefix_matches_on_a_path_component_boundary(ref, prefix, expected):
    assert references.matches_prefix(references.parse(ref), prefix) is expected


def test_familiar_form():
    assert references.parse("nginx").familiar == "nginx:latest"
    assert references.parse("nvcr.io/nvidia/pytorch:1").familiar == "nvcr.io/nvidia/pytorch:1"


@pytest.mark.parametrize("prefix", ["", " ", "nvcr.io/nvidia; rm", "$(x)", "a b"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(RefusedReference):
        references.validate_prefix(prefix)


def test_prefix_trailing_slash_is_dropped():
    assert references.validate_prefix("nvcr.io/nvidia/") == "nvcr.io/nvidia"


@pytest.mark.parametrize("prefix, normalized", [
    ("docker.io/nginx", "docker.io/nginx"),
    ("library/nginx", "docker.io/library/nginx"),
    ("index.docker.io/x", "docker.io/x"),
    ("Registry.Example.com/x", "registry.example.com/x"),
    ("harbor.local:443", "harbor.local:443"),
])
def test_prefixes_are_normalized_as_references_are(prefix, normalized):
    assert references.validate_prefix(prefix) == normalized


@pytest.mark.parametrize("prefix, ref", [
    ("docker.io/nginx", "nginx"),
    ("library/nginx", "nginx:1.25"),
    ("index.docker.io/x", "docker.io/x/app:1"),
    ("Registry.Example.com/x", "registry.example.com/x/app:1"),
    ("registry.example.com/x", "Registry.Example.com/x/app:1"),
    ("docker.io/bcm11", "bcm11/app:1"),
])
def test_a_normalized_prefix_matches_what_the_runtime_reports(prefix, ref):
    assert references.matches_prefix(references.parse(ref), references.validate_prefix(prefix))


@pytest.mark.parametrize("prefix, meant", [
    ("https://harbor.local/x", "harbor.local/x"),
    ("nvcr.io/nvidia/pytorch:24.01", "nvcr.io/nvidia/pytorch"),
    ("nginx:1.25", "nginx"),
    ("Bcm11/App", "bcm11/app"),
])
def test_a_prefix_that_can_never_match_is_refused_with_what_was_meant(prefix, meant):
    with pytest.raises(RefusedReference) as refused:
        references.validate_prefix(prefix)
    assert refused.value.reason.endswith(f"did you mean {meant}?")
