"""The backend's models-as-code routes: drift, plan, and the copy that updates and rollbacks use.

- ``GET /config/drift`` reports how the fleet differs from its declared models (``drift.py``);
- ``GET /config/plan?update=true|false`` the actions that would bring it back (``update`` re-pulls
  declared tags for new builds); ``gpu-bridge models apply`` carries them out host by host through
  the routes that change state (pull, delete, copy, load);
- ``POST /config/copy-model`` copies a model under another name on the chosen hosts (no download).

Registered on the backend's blueprint by routes.py.
"""

from __future__ import annotations

from flask import jsonify
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue

from .. import names
from ..errors import InvalidRequest
from .drift import current_monitor, install
from .inputs import bool_query, hosts_field, json_body
from .outcomes import JsonDict, change_answer, per_host
from .pulls import listing_changed
from .state import EXTENSION, BackendState, current_state, require_admin


def start_drift_monitor(setup: BlueprintSetupState) -> None:
    """When the app registers these routes (its state is built by then): the app's drift monitor,
    with its gauge on the backend's metrics registry."""
    state: BackendState = setup.app.extensions[EXTENSION]
    install(setup.app, state.settings, state.fleet, state.metrics.registry)


def drift_report() -> ResponseReturnValue:
    """GET /config/drift: ``in_sync``, ``drift``, ``plan`` (without update), ``hosts``, and the age."""
    return jsonify(current_monitor().report(refresh=bool_query("refresh")))


def plan_report() -> ResponseReturnValue:
    """GET /config/plan: the same observation's plan, with ``update`` when asked."""
    return jsonify(current_monitor().report(refresh=bool_query("refresh"), update=bool_query("update")))


def _name_field(body: JsonDict, field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise InvalidRequest(f"missing field {field!r} (a model name such as 'llama3.2:latest')")
    return names.parse(value).display  # the grammar; no allow-list: a copy fetches nothing


def copy_model() -> ResponseReturnValue:
    """POST /config/copy-model ``{"source", "destination", "hosts"?}``: per host ``{ok, source,
    destination, digest}`` or its error, like delete-model."""
    st = current_state()
    require_admin(st)
    body = json_body()
    source, destination = _name_field(body, "source"), _name_field(body, "destination")
    labels = hosts_field(body) or st.fleet.labels
    answers = st.fleet.fan_out(labels, "copy_model", source, destination, deadline=st.fleet.change_deadline)
    results = per_host(answers)
    listing_changed(st)  # a new name on the hosts: no instance may serve its memo of the old listing
    return change_answer(f"copying {source} to {destination}", "copy", source, labels, results,
                         {"source": source, "destination": destination, "results": results},
                         {"destination": destination})


__all__ = ["copy_model", "drift_report", "plan_report", "start_drift_monitor"]
