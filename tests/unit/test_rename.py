"""rename inside a mounted tree: only when the instance still has its old name."""

from __future__ import annotations

import pytest

from ganeti_debootstrap import rename
from ganeti_debootstrap.target import Target


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "etc").mkdir()
    return tmp_path


def write(tree, name, text):
    (tree / "etc" / name).write_text(text)


def read(tree, name):
    return (tree / "etc" / name).read_text()


def test_rename_updates_hostname_mailname_and_hosts(tree):
    write(tree, "hostname", "old.example.org\n")
    write(tree, "mailname", "old.example.org\n")
    write(tree, "hosts", "127.0.0.1\tlocalhost\n127.0.1.1\told.example.org old\n"
                         "198.51.100.7 db.example.org\n")
    changed = rename.apply(Target(str(tree)), "old.example.org", "new.example.org")
    assert changed == ["/etc/hostname", "/etc/mailname", "/etc/hosts"]
    assert read(tree, "hostname") == "new.example.org\n"
    assert read(tree, "mailname") == "new.example.org\n"
    assert read(tree, "hosts") == ("127.0.0.1\tlocalhost\n127.0.1.1\tnew.example.org new\n"
                                   "198.51.100.7 db.example.org\n")


def test_rename_keeps_the_short_form_when_hostname_was_short(tree):
    write(tree, "hostname", "old\n")
    rename.apply(Target(str(tree)), "old.example.org", "new.example.org")
    assert read(tree, "hostname") == "new\n"


def test_rename_refuses_when_hostname_differs_and_changes_nothing(tree):
    write(tree, "hostname", "custom.example.org\n")
    write(tree, "mailname", "old.example.org\n")
    with pytest.raises(rename.RenameError, match="'custom.example.org'.*changes nothing"):
        rename.apply(Target(str(tree)), "old.example.org", "new.example.org")
    assert read(tree, "hostname") == "custom.example.org\n"
    assert read(tree, "mailname") == "old.example.org\n"


def test_rename_refuses_when_hostname_is_missing(tree):
    with pytest.raises(rename.RenameError):
        rename.apply(Target(str(tree)), "old", "new")


def test_mailname_with_another_name_is_left_alone(tree):
    write(tree, "hostname", "old.example.org\n")
    write(tree, "mailname", "mail.example.org\n")
    changed = rename.apply(Target(str(tree)), "old.example.org", "new.example.org")
    assert "/etc/mailname" not in changed
    assert read(tree, "mailname") == "mail.example.org\n"


def test_hosts_lines_naming_others_and_comments_survive(tree):
    text = ("# old.example.org is mentioned in a comment\n"
            "10.0.0.1 gateway # not old\n"
            "127.0.1.1 old.example.org old # the instance\n")
    out = rename.rename_hosts(text, "old.example.org", "new.example.org")
    lines = out.splitlines()
    assert lines[0] == "# old.example.org is mentioned in a comment"
    assert lines[1] == "10.0.0.1 gateway # not old"
    assert lines[2].split("#")[0].split() == ["127.0.1.1", "new.example.org", "new"]
    assert lines[2].endswith("# the instance")


def test_hostname_does_not_match_a_longer_name(tree):
    assert rename.renamed("old.example.org.evil", "old.example.org", "n.example.org") is None
    assert rename.renamed("older", "old.example.org", "n.example.org") is None
