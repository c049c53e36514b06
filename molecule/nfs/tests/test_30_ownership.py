"""Spool files carry the service account's fixed ids, seen alike from both clients and the server."""

from molecule_support import SHARE_ROOT, setting

testinfra_hosts = ["gpu_servers", "prod_backends"]


def owners(host, path: str, as_user: str | None = None) -> dict:
    """{relative path: "uid:gid user:group"} of everything below path (as_user: via runuser)."""
    find = "find %s -mindepth 1 -printf '%%P %%U:%%G %%u:%%g\\n'"
    # cd /: find returns to its starting directory, and root's home is closed to the service account
    out = host.check_output(f"cd / && runuser -u {as_user} -- {find}" if as_user else find, path)
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_spool_files_owned_by_the_fixed_ids(host):
    uid, gid = setting(host, "gpu_bridge_common_uid"), setting(host, "gpu_bridge_common_gid")
    user, group = setting(host, "gpu_bridge_common_user"), setting(host, "gpu_bridge_common_group")
    # As the service account: root on the clients is "nobody" on the share (root_squash).
    seen = owners(host, SHARE_ROOT, as_user=user)
    assert any(p.startswith("gpu_status/") for p in seen), f"no spool files yet: {seen}"
    wrong = {p: o for p, o in seen.items() if o != f"{uid}:{gid} {user}:{group}"}
    print(
        f"\n{host.backend.host}: {len(seen)} entries under {SHARE_ROOT}, all {uid}:{gid} {user}:{group}"
        if not wrong
        else f"\n{host.backend.host}: wrong owners {wrong}"
    )
    assert not wrong


def test_server_sees_the_same_ids(host, nfs_server):
    """NFSv4 sends owners as strings: the server must store the numeric ids, not nobody."""
    uid, gid = setting(host, "gpu_bridge_common_uid"), setting(host, "gpu_bridge_common_gid")
    export = setting(host, "gpu_bridge_common_command_share_src").split(":", 1)[1]
    seen = owners(nfs_server, export)
    assert seen
    assert {o.split(" ")[0] for o in seen.values()} == {f"{uid}:{gid}"}, seen


def test_root_is_squashed_and_the_channel_does_not_need_it(host):
    """The exports keep root_squash (the Linux default): root on a client cannot write the share,
    so every spool file above was written by the service account, never by root."""
    user = setting(host, "gpu_bridge_common_user")
    r = host.run("touch %s/root-was-here", SHARE_ROOT)
    if r.rc == 0:
        host.run("rm -f %s/root-was-here", SHARE_ROOT)
    assert r.rc != 0 and "Permission denied" in r.stderr, f"root can write the share: {r}"
    r = host.run("cd / && runuser -u %s -- touch %s/.probe && runuser -u %s -- rm %s/.probe",
                 user, SHARE_ROOT, user, SHARE_ROOT)
    assert r.rc == 0, r.stderr
