#!/usr/bin/python
"""Ansible module: reconcile one GPU host's Ollama models with its declared gpu_bridge_models.

Runs on the GPU host with the gpu-bridge venv's interpreter, so the plan comes from the app's own
engine (gpu_bridge.reconcile / gpu_bridge.model_exec): the module, the backend's drift report and
`gpu-bridge models plan|apply` can never disagree. It talks to the host's GPU server on loopback
(gunicorn's upstream address, the API token credential), so pulls appear in its job list and obey its
limits like any other.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_bridge_models
short_description: Keep a GPU host's Ollama models in their declared state
description:
  - Compares the models declared for this host (C(gpu_bridge_models)) with what its Ollama holds
    (names and digests, and which are resident in GPU memory), plans pulls, deletes, updates and
    preloads with gpu-bridge's reconciliation engine, and carries them out through the local GPU server.
  - Check mode computes the plan and changes nothing; with C(--diff) the plan is shown as a diff.
  - Idempotent; a second run reports no change.
  - Must run with the gpu-bridge venv's Python (C(ansible_python_interpreter=/opt/gpu-bridge/venv/bin/python)).
options:
  host:
    description: This host's label in messages (the inventory name).
    type: str
    required: true
  models:
    description: The declared models (C(gpu_bridge_models)); entries C(name), C(state) (present|absent),
      C(loaded) (bool), C(keep_alive).
    type: list
    elements: raw
    default: []
  prune:
    description: Delete installed models that are not declared (snapshots of declared models stay).
    type: bool
    default: false
  update:
    description: Re-pull every declared model to pick up new registry builds; the replaced build is kept as
      a snapshot (tag suffix C(-gpubridge-prev)).
    type: bool
    default: false
  rollback:
    description: Models to put back to their snapshot (a copy, no download); the digest is verified.
    type: list
    elements: str
    default: []
  url:
    description: The GPU server on loopback (gunicorn's upstream).
    type: str
    default: http://127.0.0.1:8002
  token_file:
    description: File holding the GPU API bearer token.
    type: path
    default: /etc/gpu-bridge/credentials/api-token
  timeout:
    description: Seconds to wait for one pull or load to finish.
    type: float
    default: 3600
author:
  - gpu-bridge maintainers
"""

EXAMPLES = r"""
- name: Keep the declared models
  gpu_bridge_models:
    host: "{{ inventory_hostname }}"
    models: "{{ gpu_bridge_models | default([]) }}"
    prune: "{{ gpu_bridge_models_prune | default(false) }}"
  vars:
    ansible_python_interpreter: /opt/gpu-bridge/venv/bin/python
"""

RETURN = r"""
plan:
  description: The actions planned (host, op, model, reason, snapshot, keep_alive).
  returned: always
  type: list
  elements: dict
drift:
  description: How the host differed from its declared state before this run (host, model, kind, detail).
  returned: always
  type: list
  elements: dict
results:
  description: What each action did (changed, detail, digest_before, digest_after); empty in check mode.
  returned: always
  type: list
  elements: dict
"""

from urllib.parse import quote  # noqa: E402 - Ansible modules import after their DOCUMENTATION

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


class GpuServerOps:
    """ModelOps (gpu_bridge.model_exec) over the local GPU server's HTTP API."""

    def __init__(self, url, token, timeout, errors):
        import requests  # the venv's; imported here so a wrong interpreter fails with our message

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.errors = errors
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method, path, *, json=None, params=None, read_timeout=60.0, missing_ok=False):
        import requests

        try:
            response = self.session.request(method, self.url + path, json=json, params=params,
                                            timeout=(5.0, read_timeout))
        except requests.Timeout:
            raise self.errors.GpuHostTimeout(f"{method} {path}: the GPU server at {self.url} did not answer within "
                                             f"{read_timeout:g} s (gpu_models_timeout for pulls and loads)") from None
        except requests.RequestException as exc:
            raise self.errors.GpuHostUnreachable(f"the GPU server at {self.url} did not answer "
                                                 f"({type(exc).__name__}): is gpu-bridge-gpu running there?") from None
        if missing_ok and response.status_code in (404, 405):
            return None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:300]}
        if response.status_code < 400 and not isinstance(body, dict):
            raise self.errors.GpuBridgeError(f"{method} {path}: the GPU server at {self.url} answered "
                                             f"HTTP {response.status_code} without a JSON object")
        if response.status_code >= 400:
            code = body.get("code") if isinstance(body, dict) else None
            message = body.get("error") if isinstance(body, dict) else None
            cls = self.errors.ModelNotFound if code == "model_not_found" else self.errors.GpuBridgeError
            raise cls(f"{method} {path}: HTTP {response.status_code} {code or ''}: {message or body}")
        return body

    def list_models(self):
        models = self._call("GET", "/api/models").get("models")
        if not isinstance(models, list):
            raise self.errors.GpuBridgeError(f"GET /api/models on {self.url}: no list of models in the answer")
        return models

    def loaded(self):
        """The models resident in GPU memory; None from a GPU server older than the route (it answers
        GET /api/models/<name> with 405, or 404), which cannot say."""
        body = self._call("GET", "/api/models/loaded", missing_ok=True)
        models = None if body is None else body.get("models")
        if body is not None and not isinstance(models, list):
            raise self.errors.GpuBridgeError(f"GET /api/models/loaded on {self.url}: no list of models in the answer")
        return models

    def copy(self, source, destination):
        self._call("POST", "/api/copy", json={"source": source, "destination": destination})

    def pull(self, name):
        self._call("POST", f"/api/models/{quote(name, safe='/:')}", params={"wait": "true"},
                   read_timeout=self.timeout)

    def delete(self, name):
        self._call("DELETE", f"/api/models/{quote(name, safe='/:')}")

    def load(self, name, keep_alive):
        body = {} if keep_alive is None else {"keep_alive": keep_alive}
        self._call("POST", f"/api/models/{quote(name, safe='/:')}/load", params={"wait": "true"}, json=body,
                   read_timeout=self.timeout)


def _lines(observed, key, display):
    """One line per installed model, for --diff: name as Ollama lists it, short digest ("pulled" when
    it comes from the registry in this run), and whether it is resident in GPU memory."""
    out = []
    for installed in sorted(observed.models.values(), key=lambda m: display(m.name)):
        resident = " loaded" if observed.loaded and key(installed.name) in observed.loaded else ""
        out.append(f"{display(installed.name)} {(installed.digest or 'pulled')[:12]}{resident}")
    return "\n".join(out) + ("\n" if out else "")


def _rollbacks(host, requested, observed, reconcile, names, errors):
    """The rollback actions a run needs, checked against what the host holds before anything runs:
    a missing snapshot fails the run (also in check mode), and a model already at its snapshot's build
    needs no action (so check mode and a second run both report no change)."""
    actions = []
    for raw in requested:
        try:
            name = names.parse(raw).display  # what Ollama lists: llama3.2 -> llama3.2:latest
        except errors.InvalidModelName as exc:
            raise errors.InvalidRequest(f"gpu_models_rollback: {exc.message}") from None
        snapshot = reconcile.snapshot_name(name)
        held = observed.models.get(reconcile.model_key(snapshot))
        if held is None:
            raise errors.ModelNotFound(f"no snapshot of {name} ({snapshot}) to roll back to: a snapshot is made "
                                       "when an update (gpu_models_update=true) changes the build")
        current = observed.models.get(reconcile.model_key(name))
        if current is not None and current.digest == held.digest:
            continue
        actions.append(reconcile.Action(host, "rollback", name, f"copy {snapshot} back", snapshot=snapshot))
    return actions


def main():
    module = AnsibleModule(
        argument_spec={
            "host": {"type": "str", "required": True},
            "models": {"type": "list", "elements": "raw", "default": []},
            "prune": {"type": "bool", "default": False},
            "update": {"type": "bool", "default": False},
            "rollback": {"type": "list", "elements": "str", "default": []},
            "url": {"type": "str", "default": "http://127.0.0.1:8002"},
            "token_file": {"type": "path", "default": "/etc/gpu-bridge/credentials/api-token", "no_log": False},
            "timeout": {"type": "float", "default": 3600.0},
        },
        supports_check_mode=True,
    )
    p = module.params
    if p["update"] and p["rollback"]:
        # An update would replace the very snapshot the rollback copies back: one or the other.
        module.fail_json(msg="gpu_models_update and gpu_models_rollback cannot be used in the same run: "
                             "roll back first, or update without rolling back")
    try:
        from gpu_bridge import errors, model_exec, names, reconcile
    except ImportError as exc:
        module.fail_json(msg=f"gpu_bridge is not importable ({exc}): run this module with the gpu-bridge venv's "
                             "Python (ansible_python_interpreter=/opt/gpu-bridge/venv/bin/python)")
    host = p["host"]
    try:
        spec = reconcile.parse_spec(host, p["models"], prune=p["prune"])
        with open(p["token_file"], encoding="utf-8") as handle:
            token = handle.read().strip()
    except errors.GpuBridgeError as exc:
        module.fail_json(msg=exc.message)
    except OSError as exc:
        module.fail_json(msg=f"{host}: cannot read the API token {p['token_file']}: {exc.strerror}")
    ops = GpuServerOps(p["url"], token, p["timeout"], errors)
    result = {"changed": False, "plan": [], "drift": [], "results": []}
    try:
        observed = reconcile.Observed.from_listing(host, ops.list_models(), ops.loaded())
        if observed.loaded is None and any(d.loaded for d in spec.models):
            # Without the list every run would preload again and never report "in the declared state".
            raise errors.GpuBridgeError(f"the GPU server at {ops.url} cannot list loaded models "
                                        "(GET /api/models/loaded): deploy the current gpu-bridge "
                                        "(playbooks/site.yml) before declaring loaded: true")
        drift = reconcile.detect_drift([spec], {host: observed})
        actions = reconcile.plan([spec], {host: observed}, update=p["update"])
        rollbacks = _rollbacks(host, p["rollback"], observed, reconcile, names, errors)
        actions += rollbacks
        result["plan"] = [a.to_dict() for a in actions]
        result["drift"] = [d.to_dict() for d in drift]
        after = reconcile.apply_to(observed, [a for a in actions if a.op != "rollback"], registry={})
        for action in rollbacks:  # a rollback gives the model its snapshot's digest back
            snapshot = observed.models[reconcile.model_key(action.snapshot)]
            after.models[reconcile.model_key(action.model)] = type(snapshot)(action.model, snapshot.digest)
        def display(name):
            return names.parse(name).display

        result["diff"] = {"before": _lines(observed, reconcile.model_key, display),
                          "after": _lines(after, reconcile.model_key, display),
                          "before_header": f"{host}: installed", "after_header": f"{host}: planned"}
        if module.check_mode:
            result["changed"] = bool(actions)
            module.exit_json(**result)
        for action in actions:
            if action.op == "rollback":
                outcome = model_exec.rollback(host, action.model, ops)
            else:
                outcome = model_exec.execute(action, ops)
            result["results"].append(outcome.to_dict())
            result["changed"] = result["changed"] or outcome.changed
    except errors.GpuBridgeError as exc:
        # Where the run stopped, once there was a plan: the actions before it did happen.
        done = f" (after {len(result['results'])} of {len(result['plan'])} planned actions)" if result["plan"] else ""
        module.fail_json(msg=f"{host}: {exc.message}{done}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
