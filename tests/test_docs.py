"""Docs that match the code: every environment variable the package reads is in the README, and every
default is the same in config.py, the README's tables, the roles' defaults, argument specs and READMEs."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import yaml

from gpu_bridge.config import SETTINGS

REPO = Path(__file__).resolve().parents[1]


def _variables_in_code() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "app" / "src" / "gpu_bridge").rglob("*.py"):
        names |= set(re.findall(r'"((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)"', path.read_text()))
    return names


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)`", readme))
    missing = sorted(_variables_in_code() - documented)
    assert not missing, f"README.md lacks these settings: {missing}"


def test_readme_documents_no_setting_the_code_does_not_read():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)`", readme, re.M))
    unknown = sorted(documented - _variables_in_code())
    assert not unknown, f"README.md documents settings no code reads: {unknown}"


def test_readme_gives_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "scripts/lab up" in readme and "scripts/test" in readme
    assert (REPO / "scripts" / "test").exists() and (REPO / "scripts" / "lab").exists()
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test" in ci


# --- every default in one place: config.py's Setting table against the README and the roles ---------
ROLES = ("gpu_bridge_common", "gpu_http_server", "prod_backend")
# Role variables whose argument-spec default is written differently from defaults/main.yml on purpose.
SPEC_DEFAULT_AS_TEXT = {
    "gpu_bridge_common_lab_pki_dir": "the spec spells the inventory hash out in words, for ansible-doc readers",
}
# Variables a role's env file sets that are no setting of the table (no library default to agree with).
NOT_IN_THE_TABLE = {
    "GPU_INSTANCE_HOSTS": "the GPU hosts, computed in the inventory; the library has none",
    "GPU_INSTANCE_HOST": "the first of them, for the seed's scripts",
    "GPU_BRIDGE_GPU_CA_FILE": "a file the role installs (TLS); the library uses the system's CA bundle",
    "GPU_BRIDGE_CLIENT_CERT_FILE": "a file the role installs (TLS); the library presents no certificate",
}
# Settings whose deployed default differs from the library's on purpose: env var -> (value, reason).
DEPLOY_DEFAULTS = {
    "GPU_BRIDGE_GPU_SCHEME": ("https", "the roles deploy mutual TLS to the GPU hosts (prod_backend_gpu_tls: true); "
                                       "the library's http suits a test bench without nginx"),
    "GPU_BRIDGE_NFS_HOST_ID": ("gpu-host-1", "the worker's id is its inventory name, the name the backends list; "
                                             "the library falls back to the machine's host name"),
}
INVENTORY_HOSTNAME = "gpu-host-1"


def _readme_defaults() -> dict[str, str]:
    """{variable: its default cell} from the README's configuration tables."""
    cells: dict[str, str] = {}
    for line in (REPO / "README.md").read_text().splitlines():
        row = re.match(r"^\| ((?:`(?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+`(?: / )?)+) \| ([^|]*) \|", line)
        if row:
            for name in re.findall(r"`([A-Z0-9_]+)`", row.group(1)):
                cells[name] = row.group(2).strip()
    return cells


def test_readme_tables_give_the_defaults_of_config_py():
    cells = _readme_defaults()
    wrong = {}
    for setting in SETTINGS:
        cell = cells.get(setting.env)
        if setting.shown is not None or setting.default is not None:
            expected_ok = cell == (setting.shown if setting.shown is not None else f"`{setting.render()}`")
        else:  # unset by default: the README says "none" or "unset", maybe followed by what the units set
            expected_ok = cell is not None and cell.split(" ")[0].rstrip(",") in ("none", "unset")
        if not expected_ok:
            wrong[setting.env] = (cell, setting.shown or setting.render())
    assert not wrong, f"README default cells differing from config.py (README, config.py): {wrong}"


def test_the_readmes_rendering_of_each_default_parses_back_to_it():
    for setting in SETTINGS:
        if setting.shown is None and setting.default is not None:
            assert setting.parse(setting.render()) == setting.default, setting.env


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _role_context() -> dict:
    """Every role's defaults and vars, as a play with no inventory overrides sees them."""
    context: dict = {"inventory_hostname": INVENTORY_HOSTNAME}
    for role in ROLES:
        context.update(_yaml(REPO / "roles" / role / "defaults" / "main.yml"))
        context.update(_yaml(REPO / "roles" / role / "vars" / "main.yml"))
    return context


def _env_file_mappings() -> dict[str, dict[str, str]]:
    """{role: {variable: the Jinja expression its env file writes}}: vars/main.yml's __<role>_env and the
    dict literals the env template adds ({% set ... = {'GPU_BRIDGE_X': role_var, ...} %})."""
    out: dict[str, dict[str, str]] = {}
    for role in ("gpu_http_server", "prod_backend"):
        mapping = dict(_yaml(REPO / "roles" / role / "vars" / "main.yml")[f"__{role}_env"])
        for template in (REPO / "roles" / role / "templates").glob("*.env.j2"):
            for name, expr in re.findall(r"'((?:GPU_BRIDGE|GPU_INSTANCE)_[A-Z0-9_]+)':\s*([a-z_][a-z0-9_]*)",
                                         template.read_text()):
                mapping[name] = "{{ " + expr + " }}"
        out[role] = mapping
    return out


def _render(expression: str, context: dict) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)  # noqa: S701 - text for a test, not HTML
    value = expression
    for _ in range(5):  # vars referring to vars (__prod_backend_nfs_root -> gpu_bridge_common_nfs_root)
        if "{{" not in str(value):
            break
        value = env.from_string(str(value)).render(context)
    return str(value)


def _role_variable(expression: str, context: dict) -> str | None:
    """The role input an env-file expression writes straight through (filters allowed), else None."""
    for _ in range(5):
        direct = re.fullmatch(r"\{\{\s*([a-z_][a-z0-9_]*)\s*(\|[^}]*)?\}\}", str(expression).strip())
        if not direct:
            return None
        name = direct.group(1)
        if not name.startswith("__"):
            return name
        expression = context[name]
    return None


def test_role_env_files_write_the_library_defaults():
    """With every role default, each GPU_BRIDGE_* line of the env files parses to config.py's default."""
    context = _role_context()
    by_env = {s.env: s for s in SETTINGS}
    wrong, unknown = {}, []
    for role, mapping in _env_file_mappings().items():
        for name, expression in mapping.items():
            if name in NOT_IN_THE_TABLE:
                continue
            setting = by_env.get(name)
            if setting is None:
                unknown.append(name)
                continue
            text = _render(expression, context)
            value = setting.parse(text) if text else setting.default  # an empty value is left out of the file
            expected = DEPLOY_DEFAULTS[name][0] if name in DEPLOY_DEFAULTS else setting.default
            if value != expected:
                wrong[f"{role}: {name}"] = (text, expected)
    assert not unknown, f"env-file variables neither in config.SETTINGS nor in NOT_IN_THE_TABLE: {unknown}"
    assert not wrong, f"role defaults that differ from config.py (env-file text, expected): {wrong}"


def _argument_specs(role: str) -> dict[str, dict]:
    return _yaml(REPO / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]


def test_role_variables_feeding_a_setting_have_its_type_in_the_argument_specs():
    context = _role_context()
    by_env = {s.env: s for s in SETTINGS}
    specs = {}
    for role in ROLES:
        for entry, spec in _argument_specs(role).items():
            for option, body in spec.get("options", {}).items():
                specs.setdefault(option, []).append((f"{role}:{entry}", body))
    wrong = {}
    for mapping in _env_file_mappings().values():
        for name, expression in mapping.items():
            variable = _role_variable(expression, context)
            if name not in by_env or variable is None:
                continue
            kind = by_env[name].kind
            allowed = {"str": {"str", "path"}}.get(kind, {kind})
            assert variable in specs, f"{variable} (feeds {name}) has no argument spec"
            for where, body in specs[variable]:
                if body.get("type", "str") not in allowed:
                    wrong[f"{where} {variable}"] = (body.get("type"), sorted(allowed), name)
    assert not wrong, f"argument-spec types that refuse values the setting takes (spec, setting's, variable): {wrong}"


def test_argument_specs_repeat_the_defaults_of_defaults_main_yml():
    wrong, undeclared = {}, []
    for role in ROLES:
        defaults = _yaml(REPO / "roles" / role / "defaults" / "main.yml")
        specs = _argument_specs(role)
        undeclared += sorted(set(defaults) - set(specs["main"]["options"]))
        for entry, spec in specs.items():
            for option, body in spec.get("options", {}).items():
                if option in SPEC_DEFAULT_AS_TEXT or option not in defaults:
                    continue
                if body.get("default") != defaults[option]:
                    wrong[f"{role}:{entry} {option}"] = (body.get("default"), defaults[option])
    assert not undeclared, f"role defaults without an argument spec in the main entry point: {undeclared}"
    assert not wrong, f"argument-spec defaults differing from defaults/main.yml (spec, defaults): {wrong}"


def test_the_cli_writes_the_url_default_of_the_table():
    """The CLI reads GPU_BRIDGE_URL itself; where its module spells the default out, it must agree."""
    from gpu_bridge.config import CLI_URL

    spelled = {}
    for path in (REPO / "app" / "src" / "gpu_bridge").rglob("*.py"):
        text = path.read_text()
        if '"GPU_BRIDGE_URL"' in text:
            spelled.update({str(path): url for url in re.findall(r'^DEFAULT_URL = "([^"]+)"', text, re.M)})
    assert all(url == CLI_URL.default for url in spelled.values()), spelled


def test_role_readmes_state_the_defaults_of_defaults_main_yml():
    """The role READMEs quote each default as an indented `name: value` line; it must be the real one."""
    wrong = {}
    for role in ROLES:
        defaults = _yaml(REPO / "roles" / role / "defaults" / "main.yml")
        text = (REPO / "roles" / role / "README.md").read_text()
        for name, value in re.findall(rf"^    ({role}_[a-z0-9_]+): (.*)$", text, re.M):
            if name in defaults and "{{" not in value and yaml.safe_load(value) != defaults[name]:
                wrong[name] = (value, defaults[name])
    assert not wrong, f"role README defaults differing from defaults/main.yml (README, defaults): {wrong}"
