"""Every program the build and the tests run comes from a package `.ci/deps` names, or
from a required package that every Debian system has (issue 26: a fresh machine's
`make check` failed on a tool that only the machines it had passed on had been given
by hand). How programs are found: `tests/support/toolscan.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import toolscan

ROOT = Path(__file__).resolve().parent.parent

#: words found in an argv's shape that this machine has as a program, but that are not
#: run as one here; each with why
NOT_RUN = {
    "docker": "the engine kinds of tests/support/engines.py; the CLI is run by its path "
              "(support.dockerd.DOCKER_CLI, docker.io's)",
    "idle": "a connection's name in tests/test_gateway_drain.py",
    "python3": ".ci/run installs python3 when the machine has none (CI's has pyenv's)",
}


def test_every_program_run_comes_from_a_package_ci_deps_names() -> None:
    found = toolscan.scan_tree(ROOT)
    verdict = toolscan.judge(found, toolscan.ci_deps_packages(ROOT / ".ci/deps"), NOT_RUN)
    assert not verdict.unnamed, "programs whose package .ci/deps does not name: " + "; ".join(
        f"{w} ({p}) at {', '.join(found.places[w][:3])}" for w, p in verdict.unnamed.items())
    assert not verdict.outside, "programs no package installed (a fresh machine lacks them): " \
        + "; ".join(f"{w} = {p} at {', '.join(found.places[w][:3])}"
                    for w, p in verdict.outside.items())
    # what the build cannot do without is seen, so the scan reads the scripts at all
    assert {"debootstrap", "dpkg-buildpackage", "rpmbuild", "buildah", "objdump",
            "readelf", "systemd-nspawn"} <= set(verdict.named)


def test_the_scan_finds_a_program_of_an_unnamed_package_and_one_of_no_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".ci").mkdir()
    (tmp_path / "packaging").mkdir()
    (tmp_path / ".ci/deps").write_text("packages=(\n  coreutils  # cat\n)\n")
    (tmp_path / "packaging/build.sh").write_text(
        "#!/bin/bash\n"
        "helper() { lintian --version; }\n"
        "cat <<'EOF'\nrpmbuild in a heredoc is text\nEOF\n"
        "ROOT_PACKAGES=(rpmlint\n  reprepro)\n"
        "x=$(shellcheck --version) && helper  # a comment naming umoci\n"
        "echo 'createrepo_c quoted'\n")
    found = toolscan.scan_tree(tmp_path)
    assert {"lintian", "shellcheck", "cat"} <= set(found.places)
    assert not {"rpmbuild", "rpmlint", "reprepro", "umoci", "createrepo_c", "helper"} \
        & set(found.places)
    verdict = toolscan.judge(found, toolscan.ci_deps_packages(tmp_path / ".ci/deps"))
    assert verdict.unnamed == {"lintian": "lintian", "shellcheck": "shellcheck"}
    # a program installed by hand, outside every package
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "handmade-tool").write_text("#!/bin/sh\n")
    (bin_dir / "handmade-tool").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests/t.py").write_text(
        'import subprocess\nsubprocess.run(["handmade-tool", "-V"])\n')
    verdict = toolscan.judge(toolscan.scan_tree(tmp_path),
                             toolscan.ci_deps_packages(tmp_path / ".ci/deps"))
    assert verdict.outside == {"handmade-tool": str(bin_dir / "handmade-tool")}
