"""Spool files carry the service account's fixed ids, seen alike from both clients and the server."""

from molecule_support import SHARE_ROOT, run_as_service_account, setting

testinfra_hosts = ["gpu_servers", "prod_backends"]


FIND_OWNERS = "find %s -mindepth 1 -printf '%%P %%U:%%G %%u:%%g\\n'"


def owners_from(output: str) -> dict:
    """{relative path: "uid:gid user:group"} from FIND_OWNERS' output."""
    return dict(line.split(" ", 1) for line in output.splitlines())


def test_spool_files_owned_by_the_fixed_ids(host):
    uid, gid = setting(host, "gpu_bridge_common_uid"), setting(host, "gpu_bridge_common_gid")
    user, group = setting(host, "gpu_bridge_common_user"), setting(host, "gpu_bridge_common_group")
    # As the service account: root on the clients is "nobody" on the share (root_squash).
    r = run_as_service_account(host, FIND_OWNERS, SHARE_ROOT)
    assert r.rc == 0, r.stderr
    seen = owners_from(r.stdout)
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
    seen = owners_from(nfs_server.check_output(FIND_OWNERS, export))
    assert seen
    assert {o.split(" ")[0] for o in seen.values()} == {f"{uid}:{gid}"}, seen


def test_root_is_squashed_and_the_channel_does_not_need_it(host):
    """The exports keep root_squash (the Linux default): root on a client cannot write the share,
    so every spool file above was written by the service account, never by root."""
    r = host.run("touch %s/root-was-here", SHARE_ROOT)
    if r.rc == 0:
        host.run("rm -f %s/root-was-here", SHARE_ROOT)
    assert r.rc != 0 and "Permission denied" in r.stderr, f"root can write the share: {r}"
    r = run_as_service_account(host, "sh -c %s", f"touch {SHARE_ROOT}/.probe && rm {SHARE_ROOT}/.probe")
    assert r.rc == 0, r.stderr
