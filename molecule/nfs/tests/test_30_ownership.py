"""Spool files carry the service account's fixed ids, seen alike from both clients and the server."""

from molecule_support import SHARE_ROOT, setting

testinfra_hosts = ["gpu_servers", "prod_backends"]


def owners(host, path: str) -> dict:
    """{relative path: "uid:gid user:group"} of everything below path."""
    out = host.check_output("find %s -mindepth 1 -printf '%%P %%U:%%G %%u:%%g\\n'", path)
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_spool_files_owned_by_the_fixed_ids(host):
    uid, gid = setting(host, "gpu_bridge_common_uid"), setting(host, "gpu_bridge_common_gid")
    user, group = setting(host, "gpu_bridge_common_user"), setting(host, "gpu_bridge_common_group")
    seen = owners(host, SHARE_ROOT)
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
