"""The instance's APT sources, per release, checked on synthetic trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ganeti_debootstrap import apt_sources, filesystems, instance_files, osparams
from ganeti_debootstrap.apt_sources import Release, SourcesPlan
from ganeti_debootstrap.errors import ConfigError
from ganeti_debootstrap.settings import Settings
from ganeti_debootstrap.target import Target
from tests.systemtree import make_tree as make_system_tree
from tests.systemtree import write

DEBIAN = "http://deb.debian.org/debian"
SECURITY = "http://security.debian.org/debian-security"
# Placeholder site mirrors (reserved example domain): never contacted.
SITE_MIRROR = "http://mirror.example.org/debian"
UBUNTU_MIRROR = "http://mirror.example.org/ubuntu"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
UBUNTU_KEYRING = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
PROXY = "http://proxy.example.org:3128"


def make_tree(root: Path, *, distro: str = "debian", codename: str = "trixie",
              sources_list: str | None = None, keyring: bool = True) -> Target:
    """A tree with os-release (symlinked as Debian ships it), sources.list, keyring."""
    pretty = {"sid": "trixie/sid"}.get(codename, codename)
    lines = [f'PRETTY_NAME="{distro.title()} ({pretty})"', f"ID={distro}"]
    if codename != "sid":
        lines.append(f"VERSION_CODENAME={codename}")
    write(root / "usr/lib/os-release", "\n".join(lines) + "\n")
    (root / "etc").mkdir(parents=True, exist_ok=True)
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    mirror = DEBIAN if distro == "debian" else UBUNTU_MIRROR
    if sources_list is None:
        sources_list = f"deb {mirror} {codename} main\n"
    write(root / "etc/apt/sources.list", sources_list)
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/apt/apt.conf.d").mkdir(parents=True)
    if keyring:
        write(root / (DEBIAN_KEYRING if distro == "debian" else UBUNTU_KEYRING)
              .lstrip("/"), "keys")
    return Target(str(root))


def read(t: Target, inner: str) -> str:
    return Path(t.root, inner.lstrip("/")).read_text()


def exists(t: Target, inner: str) -> bool:
    return os.path.lexists(Path(t.root, inner.lstrip("/")))


def stanza(uri: str, suites: str, components: str = "main",
           signed_by: str = DEBIAN_KEYRING) -> str:
    text = f"Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: {components}\n"
    return text + (f"Signed-By: {signed_by}\n" if signed_by else "")


# --- releases -------------------------------------------------------------------------

@pytest.mark.parametrize("codename,deb822,updates,security", [
    ("trixie", True, "trixie-updates", "trixie-security"),
    ("bookworm", True, "bookworm-updates", "bookworm-security"),
    ("bullseye", False, "bullseye-updates", "bullseye-security"),
    ("buster", False, "buster-updates", "buster/updates"),
    ("sid", True, None, None),
    ("forky", True, "forky-updates", "forky-security"),
    ("zorro", True, "zorro-updates", "zorro-security"),  # unknown: newer
])
def test_debian_releases_and_their_archives(codename, deb822, updates, security):
    release = Release("debian", codename)
    assert (release.uses_deb822, release.updates_suite, release.security_suite) == (
        deb822, updates, security)


@pytest.mark.parametrize("codename,deb822", [("jammy", False), ("focal", False),
                                             ("noble", True), ("plucky", True)])
def test_ubuntu_switched_to_deb822_with_noble(codename, deb822):
    release = Release("ubuntu", codename)
    assert release.uses_deb822 == deb822
    assert release.security_suite == f"{codename}-security"


@pytest.mark.parametrize("suite,os_release,expected", [
    ("trixie", {"ID": "debian", "VERSION_CODENAME": "trixie"}, Release("debian", "trixie")),
    ("stable", {"ID": "debian", "VERSION_CODENAME": "trixie"}, Release("debian", "trixie")),
    ("testing", {"ID": "debian", "VERSION_CODENAME": "forky"}, Release("debian", "forky")),
    # sid's os-release names the next release: the suite decides.
    ("unstable", {"ID": "debian", "VERSION_CODENAME": "forky"}, Release("debian", "sid")),
    ("sid", {}, Release("debian", "sid")),
    ("noble", {}, Release("ubuntu", "noble")),
    ("newcodename", {"ID": "ubuntu", "VERSION_CODENAME": "newcodename"},
     Release("ubuntu", "newcodename")),
    ("stable", {"ID": "debian"}, Release("debian", "stable")),
    ("daedalus", {"ID": "devuan", "VERSION_CODENAME": "daedalus"}, None),
])
def test_release_is_resolved_from_the_suite_or_the_trees_os_release(suite, os_release,
                                                                    expected):
    assert apt_sources.resolve_release(suite, os_release) == expected


def test_os_release_values_are_unquoted():
    text = 'NAME="Debian GNU/Linux"\nID=debian\n# c\nVERSION_CODENAME=trixie\nBAD\n'
    assert apt_sources.parse_os_release(text) == {
        "NAME": "Debian GNU/Linux", "ID": "debian", "VERSION_CODENAME": "trixie"}


@pytest.mark.parametrize("text,mirror", [
    (f"deb {DEBIAN} trixie main\n", DEBIAN),
    (f"# deb http://old.example.org/x trixie main\ndeb [arch=amd64] {SITE_MIRROR} "
     f"trixie main\n", SITE_MIRROR),
    (f"deb [ signed-by=/k.gpg ] {SITE_MIRROR} trixie main\n", SITE_MIRROR),
    ("deb-src http://src.example.org/x trixie main\n", ""),
    ("", "")])
def test_the_bootstrap_mirror_is_read_from_a_one_line_sources_list(text, mirror):
    assert apt_sources.bootstrap_mirror(text) == mirror


# --- files per release ------------------------------------------------------------------

def test_trixie_gets_deb822_with_updates_and_security(tmp_path):
    t = make_tree(tmp_path / "root")
    changed = apt_sources.configure(t, SourcesPlan(suite="trixie"))
    assert read(t, "/etc/apt/sources.list.d/debian.sources") == (
        apt_sources.HEADER + "\n" + stanza(DEBIAN, "trixie trixie-updates") + "\n"
        + stanza(SECURITY, "trixie-security"))
    assert read(t, "/etc/apt/sources.list") == apt_sources.pointer_text(
        "/etc/apt/sources.list.d/debian.sources")
    assert sorted(changed) == ["/etc/apt/sources.list",
                               "/etc/apt/sources.list.d/debian.sources"]


def test_the_deb822_file_parses_back_to_the_same_entries(tmp_path):
    from debian.deb822 import Deb822
    t = make_tree(tmp_path / "root", codename="bookworm")
    apt_sources.configure(t, SourcesPlan(suite="bookworm", components=("main", "contrib")))
    with open(Path(t.root, "etc/apt/sources.list.d/debian.sources")) as f:
        stanzas = list(Deb822.iter_paragraphs(f))
    assert [(s["URIs"], s["Suites"], s["Components"], s["Signed-By"]) for s in stanzas] == [
        (DEBIAN, "bookworm bookworm-updates", "main contrib", DEBIAN_KEYRING),
        (SECURITY, "bookworm-security", "main contrib", DEBIAN_KEYRING)]


def test_bullseye_gets_one_line_sources(tmp_path):
    t = make_tree(tmp_path / "root", codename="bullseye")
    apt_sources.configure(t, SourcesPlan(suite="bullseye"))
    assert read(t, "/etc/apt/sources.list") == apt_sources.HEADER + (
        f"deb {DEBIAN} bullseye main\n"
        f"deb {DEBIAN} bullseye-updates main\n"
        f"deb {SECURITY} bullseye-security main\n")
    assert not exists(t, "/etc/apt/sources.list.d/debian.sources")


def test_buster_security_is_the_old_updates_suite(tmp_path):
    t = make_tree(tmp_path / "root", codename="buster")
    apt_sources.configure(t, SourcesPlan(suite="buster", mirror=SITE_MIRROR))
    assert read(t, "/etc/apt/sources.list").endswith(
        f"deb {SITE_MIRROR} buster main\n"
        f"deb {SITE_MIRROR} buster-updates main\n"
        f"deb {SECURITY} buster/updates main\n")


def test_sid_has_neither_updates_nor_security(tmp_path):
    t = make_tree(tmp_path / "root", codename="sid")
    apt_sources.configure(t, SourcesPlan(suite="unstable"))
    text = read(t, "/etc/apt/sources.list.d/debian.sources")
    assert text.endswith(stanza(DEBIAN, "sid"))
    assert "security" not in text and "updates" not in text


def test_ubuntu_jammy_gets_one_line_sources_from_the_bootstrap_mirror(tmp_path):
    t = make_tree(tmp_path / "root", distro="ubuntu", codename="jammy")
    apt_sources.configure(t, SourcesPlan(suite="jammy"))
    assert read(t, "/etc/apt/sources.list") == apt_sources.HEADER + (
        f"deb {UBUNTU_MIRROR} jammy main\n"
        f"deb {UBUNTU_MIRROR} jammy-updates main\n"
        f"deb {UBUNTU_MIRROR} jammy-security main\n")


def test_ubuntu_noble_gets_one_deb822_stanza_on_its_mirror(tmp_path):
    t = make_tree(tmp_path / "root", distro="ubuntu", codename="noble")
    apt_sources.configure(t, SourcesPlan(suite="noble", mirror=UBUNTU_MIRROR,
                                         components=("main", "universe")))
    assert read(t, "/etc/apt/sources.list.d/ubuntu.sources") == (
        apt_sources.HEADER + "\n"
        + stanza(UBUNTU_MIRROR, "noble noble-updates noble-security", "main universe",
                 UBUNTU_KEYRING))


def test_ubuntu_without_a_known_mirror_is_left_alone(tmp_path, caplog):
    t = make_tree(tmp_path / "root", distro="ubuntu", codename="noble", sources_list="")
    assert apt_sources.configure(t, SourcesPlan(suite="noble")) == []
    assert "No mirror is known" in caplog.text
    assert read(t, "/etc/apt/sources.list") == ""


def test_the_alias_stable_is_written_as_the_trees_codename(tmp_path):
    t = make_tree(tmp_path / "root", sources_list=f"deb {DEBIAN} stable main\n")
    apt_sources.configure(t, SourcesPlan(suite="stable"))
    text = read(t, "/etc/apt/sources.list.d/debian.sources")
    assert "Suites: trixie trixie-updates\n" in text and "stable" not in text


def test_the_site_mirror_and_components_are_used(tmp_path):
    t = make_tree(tmp_path / "root")
    apt_sources.configure(t, SourcesPlan(suite="trixie", mirror=SITE_MIRROR,
                                         components=("main", "non-free-firmware")))
    text = read(t, "/etc/apt/sources.list.d/debian.sources")
    assert stanza(SITE_MIRROR, "trixie trixie-updates", "main non-free-firmware") in text
    assert stanza(SECURITY, "trixie-security", "main non-free-firmware") in text


def test_without_mirror_or_sources_list_debian_gets_debootstraps_default(tmp_path):
    t = make_tree(tmp_path / "root", sources_list="")
    apt_sources.configure(t, SourcesPlan(suite="trixie"))
    assert f"URIs: {DEBIAN}\n" in read(t, "/etc/apt/sources.list.d/debian.sources")


def test_signed_by_is_left_out_without_the_keyring(tmp_path):
    t = make_tree(tmp_path / "root", keyring=False)
    apt_sources.configure(t, SourcesPlan(suite="trixie"))
    assert "Signed-By" not in read(t, "/etc/apt/sources.list.d/debian.sources")


def test_forcing_one_line_replaces_a_deb822_file(tmp_path):
    t = make_tree(tmp_path / "root")
    write(Path(t.root, "etc/apt/sources.list.d/debian.sources"), "Types: deb\n")
    changed = apt_sources.configure(t, SourcesPlan(mode="one-line", suite="trixie"))
    assert not exists(t, "/etc/apt/sources.list.d/debian.sources")
    assert "deb http://security.debian.org/debian-security trixie-security main\n" in read(
        t, "/etc/apt/sources.list")
    assert "/etc/apt/sources.list.d/debian.sources" in changed


def test_forcing_deb822_on_bullseye(tmp_path):
    t = make_tree(tmp_path / "root", codename="bullseye")
    apt_sources.configure(t, SourcesPlan(mode="deb822", suite="bullseye"))
    assert "Suites: bullseye-security\n" in read(t, "/etc/apt/sources.list.d/debian.sources")


def test_keep_leaves_the_bootstraps_sources(tmp_path):
    t = make_tree(tmp_path / "root")
    assert apt_sources.configure(t, SourcesPlan(mode="keep", suite="trixie")) == []
    assert read(t, "/etc/apt/sources.list") == f"deb {DEBIAN} trixie main\n"
    assert not exists(t, "/etc/apt/sources.list.d/debian.sources")


def test_other_distributions_are_left_alone(tmp_path, caplog):
    t = make_tree(tmp_path / "root", distro="devuan", codename="daedalus")
    assert apt_sources.configure(t, SourcesPlan(suite="daedalus")) == []
    assert "neither Debian nor Ubuntu" in caplog.text


def test_a_planted_sources_list_d_symlink_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    t = make_tree(tmp_path / "root")
    os.rmdir(Path(t.root, "etc/apt/sources.list.d"))
    os.symlink(str(outside), Path(t.root, "etc/apt/sources.list.d"))
    apt_sources.configure(t, SourcesPlan(suite="trixie"))
    assert list(outside.iterdir()) == []


# --- the node's proxy -------------------------------------------------------------------

def test_a_proxy_setting_for_the_nodes_proxy_is_removed(tmp_path):
    t = make_tree(tmp_path / "root")
    write(Path(t.root, "etc/apt/apt.conf.d/99proxy"),
          f'Acquire::http::Proxy "{PROXY}";\nAcquire::https::Proxy "{PROXY}/";\n')
    write(Path(t.root, "etc/apt/apt.conf.d/50mixed"),
          f'APT::Install-Recommends "0";\nAcquire::http::Proxy "{PROXY}";\n')
    write(Path(t.root, "etc/apt/apt.conf.d/60other"),
          'Acquire::http::Proxy "http://other.example.org:3128";\n')
    changed = apt_sources.configure(t, SourcesPlan(mode="keep", proxy=PROXY))
    assert sorted(changed) == ["/etc/apt/apt.conf.d/50mixed", "/etc/apt/apt.conf.d/99proxy"]
    assert not exists(t, "/etc/apt/apt.conf.d/99proxy")
    assert read(t, "/etc/apt/apt.conf.d/50mixed") == 'APT::Install-Recommends "0";\n'
    assert "other.example.org" in read(t, "/etc/apt/apt.conf.d/60other")


def test_no_proxy_means_nothing_to_remove(tmp_path):
    t = make_tree(tmp_path / "root")
    write(Path(t.root, "etc/apt/apt.conf.d/99proxy"), f'Acquire::http::Proxy "{PROXY}";\n')
    assert apt_sources.remove_proxy(t, "") == []
    assert exists(t, "/etc/apt/apt.conf.d/99proxy")


# --- settings and the OS parameter ------------------------------------------------------

def test_the_plan_comes_from_the_settings():
    conf = Settings(suite="bookworm", mirror=SITE_MIRROR, components=("main", "contrib"),
                    proxy=PROXY)
    assert SourcesPlan.from_settings(conf, "deb822") == SourcesPlan(
        "deb822", "bookworm", SITE_MIRROR, ("main", "contrib"), PROXY)


def test_apt_sources_parameter_accepts_its_choices():
    assert osparams.validate({}).apt_sources == "auto"
    for value in apt_sources.APT_SOURCES_MODES:
        assert osparams.validate({"apt_sources": value}).apt_sources == value
    with pytest.raises(ConfigError, match="apt_sources='yes' is not accepted.*keep"):
        osparams.validate({"apt_sources": "yes"})


def test_instance_files_configure_writes_the_sources(tmp_path):
    t = make_system_tree(tmp_path / "root")
    write(Path(t.root, "usr/lib/os-release"), "ID=debian\nVERSION_CODENAME=bookworm\n")
    os.symlink("../usr/lib/os-release", Path(t.root, "etc/os-release"))
    write(Path(t.root, "etc/resolv.conf"), "")
    node = instance_files.NodeFiles(resolv_conf=str(tmp_path / "none"),
                                    resolved_upstream=str(tmp_path / "none2"))
    instance = instance_files.Instance("a.example.org",
                                       apt=SourcesPlan(suite="bookworm"))
    done = instance_files.configure(t, instance, root=filesystems.FsEntry(
        "0a1b2c3d-1111-2222-3333-444455556666", "ext4"), node_files=node)
    assert "/etc/apt/sources.list.d/debian.sources" in done.apt_sources
    assert "Suites: bookworm bookworm-updates\n" in read(
        t, "/etc/apt/sources.list.d/debian.sources")



def test_a_file_mirror_is_written_with_a_warning(tmp_path, caplog):
    t = make_tree(tmp_path / "root")
    apt_sources.configure(t, SourcesPlan(suite="trixie", mirror="file:/srv/mirror/debian"))
    assert "URIs: file:/srv/mirror/debian\n" in read(t, "/etc/apt/sources.list.d/debian.sources")
    assert "a path on the node" in caplog.text


@pytest.mark.parametrize("field", ["uri", "suite", "component"])
@pytest.mark.parametrize("bad", ["\ndeb http://127.0.0.1/x sid main", " extra", "\t",
                                 "\u2028"])
def test_a_source_field_that_is_not_one_word_is_never_written(field, bad):
    # settings.validate refuses these first; the writer does not rely on it.
    uri, suite, comp = "http://127.0.0.1/debian", "trixie", "main"
    values = {"uri": uri + bad if field == "uri" else uri,
              "suite": suite + bad if field == "suite" else suite,
              "component": comp + bad if field == "component" else comp}
    with pytest.raises(ValueError, match="not one word"):
        apt_sources.Source(values["uri"], (values["suite"],), (values["component"],))
