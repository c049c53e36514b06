"""The seed's failure and the fix, on the same VMs and the same NFS server (tests/realnfs).

Client B (prod-01) looks up an answer name that does not exist yet, client A (gpu-01) publishes
it, B checks again at once. Default mount options + exists() (the seed) miss it; the channel's
options + open() (our protocol) see it every time.
"""

from realnfs.nfs_race import run_matrix, verdict

ROUNDS = 50


def test_mount_options_and_protocol_matter(vms, ansible_runner):
    writer = sorted(ansible_runner.get_hosts("gpu_servers"))[0]
    reader = sorted(ansible_runner.get_hosts("prod_backends"))[0]
    server = sorted(ansible_runner.get_hosts("nfs_servers"))[0]
    key = vms[writer][1]
    results = run_matrix(server, vms[writer][0], vms[reader][0], key, rounds=ROUNDS)
    print(f"\nwriter {writer}, reader {reader}, server {server}:/srv/nfs/race, NFSv4.2")
    for r in results:
        print("  " + r.line())
    print("  " + "\n  ".join(verdict(results)))
    by = {(r.options, r.method): r for r in results}
    assert "lookupcache=pos" in by["our", "open"].findmnt_reader
    assert "lookupcache" not in by["default", "exists"].findmnt_reader
    assert by["default", "exists"].missed >= ROUNDS // 2, "the seed's failure did not reproduce"
    assert by["our", "open"].missed == 0
