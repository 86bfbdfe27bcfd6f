"""deploy/ against itself: the manifests, the image and the unit agree with the example config.

The first deployment crash-looped on disagreements no single file shows: a secret mounted where
the config did not look, a metrics port bound to the pod's loopback, a non-numeric USER under
runAsNonRoot, compose paths resolved against deploy/. Each test here reads the files (YAML,
TOML, the Dockerfile and the unit line by line) and compares them with what the example config
reads and serves; one starts a real daemon on the example config. Nothing runs docker, kubectl
or systemd; where systemd-analyze is installed it rates and checks the unit.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # the dev extra names it; no stubs installed

from common.cli import build_parser
from server.config_file import load_config
from tests.scripted import AdminClient, Daemon, free_port, small_state, wait_for, write_state

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "aggregator.example.toml"
UNIT = DEPLOY / "systemd" / "gdfed-aggregator.service"
SYSUSERS = DEPLOY / "systemd" / "gdfed.sysusers"
P = PurePosixPath


# ---------------------------------------------------------------- reading the files


def _example(tls: bool = False) -> str:
    """The example config's text; ``tls``: with its commented [tls] table turned on, as its comment says."""
    text = EXAMPLE.read_text()
    if not tls:
        return text
    head, marker, tail = text.partition("# [tls]\n")
    assert marker, "the example config has no commented [tls] table"
    return head + "[tls]\n" + re.sub(r"^# (\w+ = )", r"\1", tail, flags=re.MULTILINE)


def _settings(tls: bool = False) -> dict[str, Any]:
    return tomllib.loads(_example(tls))


def _reads(settings: dict[str, Any]) -> list[P]:
    """Every file the daemon reads, by the config (state_dir, which it writes, aside)."""
    keys = ("init_state", "admin_token_file", "site_tokens_file")
    return [P(settings[k]) for k in keys if k in settings] + [P(v) for v in settings.get("tls", {}).values()]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s/, the tree's (deploy/k8s/tree/) included."""
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _object(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _pod_specs() -> Iterator[dict[str, Any]]:
    for doc in _manifests():
        if doc["kind"] == "Pod":
            yield doc["spec"]
        elif doc["kind"] == "StatefulSet":
            yield doc["spec"]["template"]["spec"]


def _aggregator() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of the aggregator's StatefulSet."""
    spec = _object("StatefulSet", "gdfed-aggregator")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    return spec, container


def _compose() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["aggregator"]
    return service


def _header(path: Path) -> str:
    """The comment block at the top of a file: the instructions an operator follows."""
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    return [
        (line.split(None, 1)[0], line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _instruction(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def _unit() -> dict[str, list[str]]:
    """The [Service] section of the unit: key -> its values in order (a key may repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def _serve_args(args: list[str]) -> P:
    """``gdfed`` arguments as the CLI parses them (SystemExit if it refuses them); the --config file."""
    parsed = build_parser("serve").parse_args(args)
    assert parsed.command == "serve"
    return P(parsed.config)


# ---------------------------------------------------------------- the example config


def test_the_example_config_loads_with_tls_off_and_on(tmp_path: Path) -> None:
    for tls in (False, True):
        root = tmp_path / ("tls" if tls else "plain")
        text = _rerooted(_example(tls), root)
        for path in _reads(tomllib.loads(text)):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("site-a = token-a\n" if path.name == "sites.tokens" else "a-token\n")
        (root / "aggregator.toml").write_text(text)
        config = load_config(root / "aggregator.toml", {})
        assert (config.tls.cert is not None) is tls
        assert config.site_tokens == {"site-a": "token-a"} and config.admin_token == "a-token"
    # Off as shipped: a first start needs no certificate (and the probes speak plaintext).
    assert "tls" not in _settings()


def _rerooted(text: str, root: Path) -> str:
    """The config with every absolute path moved under ``root``."""
    return re.sub(r'"/([^"]*)"', lambda m: f'"{root}/{m[1]}"', text)


@pytest.mark.slow
def test_the_example_config_starts_a_daemon_the_healthcheck_and_prometheus_reach(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    text = _rerooted(_example(), tmp_path)
    text = re.sub(r'^listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', text, flags=re.MULTILINE)
    text = re.sub(
        r'^metrics_listen = "[^"]*"', f'metrics_listen = "127.0.0.1:{metrics}"', text, flags=re.MULTILINE
    )
    settings = tomllib.loads(text)
    for path in _reads(settings):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_state(Path(settings["init_state"]), small_state())
    Path(settings["admin_token_file"]).write_text("a-token\n")
    Path(settings["site_tokens_file"]).write_text("site-a = token-a\n")
    (tmp_path / "aggregator.toml").write_text(text)
    daemon = Daemon(tmp_path / "aggregator.toml", tmp_path / "daemon.log")
    try:
        daemon.start(f"127.0.0.1:{port}")
        assert _healthcheck(port) == 0, daemon.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as reply:
            assert b"gdfed_build_info{" in reply.read()
        assert daemon.terminate(timeout=30) == 0
    finally:
        daemon.cleanup()
    assert _healthcheck(port) != 0  # the check does fail when nothing serves


def _healthcheck(port: int) -> int:
    """compose's healthcheck, run by this interpreter against ``port`` instead of the config's."""
    kind, program, flag, code = _compose()["healthcheck"]["test"]
    assert (kind, program, flag) == ("CMD", "python", "-c")
    listen = f"127.0.0.1:{_port(_settings()['listen'])}"
    assert listen in code
    done = subprocess.run([sys.executable, "-c", code.replace(listen, f"127.0.0.1:{port}")], timeout=30)
    return done.returncode


# ---------------------------------------------------------------- Kubernetes


def _mount_of(
    container: dict[str, Any], volumes: dict[str, dict[str, Any]], path: P
) -> tuple[dict[str, Any], P]:
    """(volume, path inside it) of the container's mount that holds ``path``."""
    for mount in container["volumeMounts"]:
        at = P(mount["mountPath"])
        if path == at or at in path.parents:
            inside = P(mount.get("subPath", "")) / path.relative_to(at)
            return {**volumes.get(mount["name"], {}), "readOnly": mount.get("readOnly", False)}, inside
    raise AssertionError(f"nothing is mounted at {path} in container {container['name']}")


def _created(resource: str, manifest: Path = DEPLOY / "k8s" / "aggregator.yaml") -> dict[str, set[str]]:
    """name -> keys of the configmaps or secrets the manifest's header comment creates."""
    created: dict[str, set[str]] = {}
    for line in _header(manifest).splitlines():
        if m := re.search(rf"kubectl create {resource} (\S+)(.*)", line):
            files = re.findall(r"--from-file=(\S+)", m[2])
            created[m[1]] = {f.partition("=")[0] if "=" in f else Path(f).name for f in files}
    return created


def test_kubernetes_mounts_every_file_the_config_reads() -> None:
    spec, container = _aggregator()
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_file = _serve_args(container["args"])
    for settings in (_settings(), _settings(tls=True)):
        for path in [config_file, *_reads(settings)]:
            volume, inside = _mount_of(container, volumes, path)
            assert volume["readOnly"], path
            source = volume.get("secret") or volume.get("configMap")
            if source is not None:
                assert str(inside) in {item["path"] for item in source["items"]}, path
            else:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert _object("PersistentVolumeClaim", claim)
    # The state directory: the StatefulSet's own volume, writable.
    state_dir = P(_settings()["state_dir"])
    [mount] = [m for m in container["volumeMounts"] if P(m["mountPath"]) == state_dir]
    templates = {
        t["metadata"]["name"]
        for t in _object("StatefulSet", "gdfed-aggregator")["spec"]["volumeClaimTemplates"]
    }
    assert mount["name"] in templates and not mount.get("readOnly", False)
    # What the header's commands create is what the volumes take.
    for resource, kind in (("configmap", "configMap"), ("secret generic", "secret")):
        created = _created(resource)
        for volume in volumes.values():
            if kind in volume:
                name = volume[kind].get("name") or volume[kind]["secretName"]
                assert {i["key"] for i in volume[kind]["items"]} <= created[name], name


def test_the_models_loader_writes_where_the_aggregator_reads() -> None:
    init_state = P(_settings()["init_state"])
    _, container = _aggregator()
    claim_of = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in _aggregator()[0]["volumes"]
    }
    [(claim, at)] = [
        (claim_of[m["name"]], P(m["mountPath"]))
        for m in container["volumeMounts"]
        if P(m["mountPath"]) in init_state.parents
    ]
    loader = _object("Pod", "gdfed-models-loader")["spec"]
    [loader_mount] = loader["containers"][0]["volumeMounts"]
    [loader_volume] = [v for v in loader["volumes"] if v["name"] == loader_mount["name"]]
    assert loader_volume["persistentVolumeClaim"]["claimName"] == claim
    assert P(loader_mount["mountPath"]) == at
    assert f"gdfed-models-loader:{init_state}" in _header(DEPLOY / "k8s" / "models.yaml")


# ---------------------------------------------------------------- compose


def test_compose_mounts_every_file_the_config_reads_from_the_repository_root() -> None:
    service = _compose()
    header = _header(DEPLOY / "compose.yaml")
    binds = _compose_binds(service, yaml.safe_load((DEPLOY / "compose.yaml").read_text()))
    named = [volume.split(":")[1] for volume in service["volumes"] if not volume.startswith(".")]
    assert [P(target) for target in named] == [P(_settings()["state_dir"])]  # the state on a volume
    config_file = _serve_args(service["command"])
    for settings in (_settings(), _settings(tls=True)):
        for path in [config_file, *_reads(settings)]:
            [(target, source)] = [(t, s) for t, s in binds.items() if t in path.parents]
            on_host = (source / path.relative_to(target)).relative_to(ROOT)  # under the repository root
            assert f"{on_host}" in header or f"{on_host.parent}/" in header, on_host
    assert service["build"]["context"] == ".." and (ROOT / service["build"]["dockerfile"]).is_file()


# ---------------------------------------------------------------- ports, TLS and probes


def test_ports_agree_between_the_config_the_image_the_service_the_probes_and_compose() -> None:
    settings = _settings()
    grpc_port, metrics_port = _port(settings["listen"]), _port(settings["metrics_listen"])
    # In a container, loopback is the pod's own: the Service and Prometheus reach its address.
    assert settings["listen"].startswith("0.0.0.0:") and settings["metrics_listen"].startswith("0.0.0.0:")
    _, container = _aggregator()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"grpc": grpc_port, "metrics": metrics_port}
    service = {p["name"]: p for p in _object("Service", "gdfed-aggregator")["spec"]["ports"]}
    for name, port in named.items():
        target = service[name]["targetPort"]
        assert named.get(target, target) == port == service[name]["port"]
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        action = probe.get("grpc") or probe["tcpSocket"]
        assert named.get(action["port"], action["port"]) == grpc_port
    annotations = _object("StatefulSet", "gdfed-aggregator")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    published = {int(p.split(":")[-1]): p for p in _compose()["ports"]}
    assert set(published) == {grpc_port, metrics_port}
    assert published[metrics_port].startswith("127.0.0.1:")  # metrics stay on the host
    [expose] = _instruction("EXPOSE")
    assert {int(p) for p in expose.split()} == {grpc_port, metrics_port}


def test_tls_and_the_probes_agree() -> None:
    _, container = _aggregator()
    grpc_probes = any("grpc" in container[p] for p in ("readinessProbe", "livenessProbe"))
    plaintext_healthcheck = "insecure_channel" in _compose()["healthcheck"]["test"][-1]
    if "tls" in _settings():
        assert not grpc_probes and not plaintext_healthcheck  # both speak plaintext only
    # With TLS off as shipped, the header says how the probes change when it is turned on.
    assert "tcpSocket" in _header(DEPLOY / "k8s" / "aggregator.yaml")


# ---------------------------------------------------------------- the image's user, the entry points


def test_the_image_runs_as_the_numeric_user_kubernetes_names() -> None:
    [user] = _instruction("USER")
    m = re.fullmatch(r"(\d+):(\d+)", user)
    assert m, f"USER {user}: the kubelet checks runAsNonRoot only against a numeric uid"
    uid, gid = int(m[1]), int(m[2])
    assert uid != 0
    run = " ".join(_instruction("RUN"))
    assert f"--uid {uid} --gid {gid}" in run and f"groupadd --system --gid {gid}" in run
    assert f"chown {uid}:{gid} {_settings()['state_dir']}" in run
    for spec in _pod_specs():
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)
    assert f"chown -R {uid}:{gid}" in _header(DEPLOY / "compose.yaml")


def test_the_entry_points_exist() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["gdfed"].partition(":")
    assert callable(getattr(import_module(module), function))
    [entrypoint] = _instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["gdfed"]
    [cmd] = _instruction("CMD")
    configs = {
        _serve_args(json.loads(cmd)),
        _serve_args(_aggregator()[1]["args"]),
        _serve_args(_compose()["command"]),
    }
    [exec_start] = _unit()["ExecStart"]
    program, *args = shlex.split(exec_start)
    assert P(program).name in scripts and P(program).is_absolute()
    configs.add(_serve_args(args))
    assert configs == {P("/etc/gdfed/aggregator.toml")}
    for copied in _instruction("COPY"):
        for source in copied.split()[:-1]:
            assert (ROOT / source).exists(), source
    for module_name in re.findall(r'python -c "import ([\w.]+)"', " ".join(_instruction("RUN"))):
        assert find_spec(module_name) is not None, module_name


# ---------------------------------------------------------------- systemd


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
}


def test_the_systemd_unit_is_hardened_and_its_user_is_created() -> None:
    unit = _unit()
    for key, value in HARDENING.items():
        assert unit.get(key) == [value], key
    assert set(unit["RestrictAddressFamilies"][0].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert unit["SystemCallFilter"][0] == "@system-service"
    # numba compiles the codec's kernels into executable memory at run time.
    assert unit.get("MemoryDenyWriteExecute", ["no"]) != ["yes"]
    settings = _settings()
    state_dir = P(settings["state_dir"])
    assert state_dir == P("/var/lib") / unit["StateDirectory"][0]
    assert state_dir in {P(p) for p in unit["ReadWritePaths"][0].split()}
    [cache] = [v.partition("=")[2] for v in unit["Environment"] if v.startswith("NUMBA_CACHE_DIR=")]
    assert state_dir in P(cache).parents  # the rest of the file system is read-only to the daemon
    # Hidden from the daemon: ProtectHome's and PrivateTmp's directories.
    hidden = [P(p) for p in ("/home", "/root", "/run/user", "/tmp", "/var/tmp")]
    for path in [P("/etc/gdfed/aggregator.toml"), *_reads(settings), *_reads(_settings(tls=True))]:
        assert not any(h == path or h in path.parents for h in hidden), path
    # The user: created by the sysusers.d file the unit's header installs.
    [user] = unit["User"]
    assert user != "root" and unit.get("Group") == [user]
    entries = [
        line.split() for line in SYSUSERS.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert ["u", user] in [e[:2] for e in entries]
    assert f"deploy/systemd/{SYSUSERS.name}" in _header(UNIT)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit_and_rates_it_ok(tmp_path: Path) -> None:
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line
        for line in (verify.stdout + verify.stderr).splitlines()
        if line and "is not executable" not in line
    ]
    assert not complaints  # an unknown or misspelt directive is ignored by systemd, silently
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout + security.stderr)
    assert m, security.stdout + security.stderr
    assert float(m[1]) <= 3.0, security.stdout


# ---------------------------------------------------------------- a tree of aggregators

TREE = DEPLOY / "k8s" / "tree"
TREE_COMPOSE = DEPLOY / "compose.tree.yaml"
EXAMPLES = {"root": DEPLOY / "root.example.toml", "intermediate": DEPLOY / "intermediate.example.toml"}
# The serve flags that are not settings (server/cli.py's run() leaves them out of the overrides).
_NOT_SETTINGS = ("config", "command", "verbose", "debug", "_module")


def _tree_text(kind: str, tls: bool, keys: tuple[str, ...] = ("ca", "cert", "key")) -> str:
    """An example config of the tree; ``tls``: its commented [tls] table and [upstream]'s ``keys`` on."""
    text = EXAMPLES[kind].read_text()
    if not tls:
        return text
    head, marker, tail = text.partition("# [tls]\n")
    assert marker, f"{EXAMPLES[kind].name} has no commented [tls] table"
    head = re.sub(rf"^# ((?:{'|'.join(keys)}) = )", r"\1", head, flags=re.MULTILINE)
    return head + "[tls]\n" + re.sub(r"^# (\w+ = )", r"\1", tail, flags=re.MULTILINE)


def _tree_reads(settings: dict[str, Any]) -> list[P]:
    """Every file a tree aggregator reads by its config: the flat ones and [upstream]'s."""
    upstream = settings.get("upstream", {})
    return _reads(settings) + [P(upstream[k]) for k in ("token_file", "ca", "cert", "key") if k in upstream]


def _serve(args: list[str]) -> tuple[P, dict[str, Any]]:
    """The --config file and the setting overrides of ``gdfed`` arguments, as `gdfed serve` takes them."""
    parsed = build_parser("serve").parse_args(args)
    assert parsed.command == "serve"
    return P(parsed.config), {k: v for k, v in vars(parsed).items() if k not in _NOT_SETTINGS}


def _flag_files(overrides: dict[str, Any]) -> list[P]:
    """The files the flags name (absolute paths)."""
    return [P(str(v)) for v in overrides.values() if isinstance(v, str | Path) and str(v).startswith("/")]


def _load_tree_config(
    tmp: Path, kind: str, args: list[str], tls: bool, keys: tuple[str, ...] = ("ca", "cert", "key")
) -> Any:
    """Load ``kind``'s example config as ``args`` run it, every path moved under ``tmp`` and every
    file it reads (the flags' too) made there."""
    text = _rerooted(_tree_text(kind, tls, keys), tmp)
    config_file, overrides = _serve(args)
    moved = {P(str(v)) for v in _flag_files(overrides)}
    overrides = {k: Path(f"{tmp}{v}") if P(str(v)) in moved else v for k, v in overrides.items()}
    settings = tomllib.loads(text)
    intermediates = settings.get("tree", {}).get("intermediates", ["site-a"])
    for path in [Path(p) for p in _tree_reads(settings)] + [Path(str(p)) for p in _flag_files(overrides)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith("sites.tokens"):
            path.write_text("".join(f"{site} = token-{site}\n" for site in intermediates))
        else:
            path.write_text(f"token-of-{path.name}\n")
        path.chmod(0o600)  # as an operator keeps tokens (the daemon warns otherwise)
    target = Path(f"{tmp}{config_file}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return load_config(target, overrides)


def _statefulset(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(StatefulSet, its one container)."""
    sts = _object("StatefulSet", name)
    [container] = sts["spec"]["template"]["spec"]["containers"]
    return sts, container


def _pods(name: str) -> list[str]:
    return [f"{name}-{i}" for i in range(_statefulset(name)[0]["spec"]["replicas"])]


def _pod_args(container: dict[str, Any], pod: str) -> list[str]:
    """The container's args as the kubelet expands them for ``pod`` ($(POD_NAME) from the env)."""
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container.get("env", [])}
    assert set(env.values()) <= {"metadata.name"}
    out = []
    for arg in container["args"]:
        for name in env:
            arg = arg.replace(f"$({name})", pod)
        out.append(arg)
    return out


def test_the_tree_configs_load_as_kubernetes_and_compose_run_them(tmp_path: Path) -> None:
    root_args = _statefulset("gdfed-root")[1]["args"]
    _, inter = _statefulset("gdfed-intermediate")
    pods = _pods("gdfed-intermediate")
    services = yaml.safe_load(TREE_COMPOSE.read_text())["services"]
    for tls in (False, True):
        base = tmp_path / ("tls" if tls else "plain")
        root = _load_tree_config(base / "root", "root", root_args, tls)
        assert list(root.tree.intermediates) == pods  # the root takes partial sums from those pods
        assert not root.upstream.enabled and (root.tls.cert is not None) is tls
        for pod in pods:
            # In Kubernetes [upstream] cert and key differ per pod: flags, as intermediates.yaml's header says.
            args = _pod_args(inter, pod)
            if tls:
                args += _header_flags(
                    TREE / "intermediates.yaml", "--upstream-cert", "--upstream-key", pod=pod
                )
            config = _load_tree_config(base / pod, "intermediate", args, tls, keys=("ca",))
            assert config.upstream.site_id == pod and config.upstream.token == "token-of-upstream.token"
            assert (config.upstream.ca is not None, config.upstream.cert is not None) == (tls, tls)
            assert config.init_state is None and not config.tree.enabled
        for name, service in services.items():
            if service["command"][0] == "serve":
                kind = "root" if name == "gdfed-root" else "intermediate"
                config = _load_tree_config(base / "compose" / name, kind, service["command"], tls)
                if kind == "intermediate":
                    assert config.upstream.site_id == name  # compose's name is the id the root knows
                else:
                    assert list(config.tree.intermediates) == [
                        s for s in services if s.startswith("gdfed-intermediate")
                    ]


def _header_flags(path: Path, *flags: str, pod: str) -> list[str]:
    """``flag value`` pairs the header of ``path`` tells the operator to add, for ``pod``."""
    header = _header(path)
    out = []
    for flag in flags:
        m = re.search(rf"{flag} (\S+)", header)
        assert m, f"{path.name}'s header does not say {flag}"
        out += [flag, m[1].replace("$(POD_NAME)", pod)]
    return out


def _tree_mount(
    container: dict[str, Any], volumes: dict[str, dict[str, Any]], path: P, pod: str
) -> tuple[dict[str, Any], P]:
    """(volume, path inside it) of the mount that holds ``path`` in ``pod`` (subPathExpr expanded)."""
    for mount in container["volumeMounts"]:
        at = P(mount["mountPath"])
        if path == at or at in path.parents:
            sub = mount.get("subPath") or mount.get("subPathExpr", "").replace("$(POD_NAME)", pod)
            return {**volumes.get(mount["name"], {}), "readOnly": mount.get("readOnly", False)}, P(
                sub
            ) / path.relative_to(at)
    raise AssertionError(f"nothing is mounted at {path} in {pod}")


def test_kubernetes_mounts_every_file_each_tier_of_the_tree_reads() -> None:
    for name, manifest, kind in (
        ("gdfed-root", TREE / "root.yaml", "root"),
        ("gdfed-intermediate", TREE / "intermediates.yaml", "intermediate"),
    ):
        sts, container = _statefulset(name)
        spec = sts["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        created = _created("secret generic", manifest) | _created("configmap", manifest)
        for pod in _pods(name):
            args = _pod_args(container, pod)
            extra = (
                _header_flags(manifest, "--upstream-cert", "--upstream-key", pod=pod)
                if kind == "intermediate"
                else []
            )
            config_file, overrides = _serve(args + extra)
            flag_files = _flag_files(overrides)
            for settings in (tomllib.loads(_tree_text(kind, False)), tomllib.loads(_tree_text(kind, True))):
                for path in [config_file, *_tree_reads(settings), *flag_files]:
                    if kind == "intermediate" and path.name in ("client.crt", "client.key"):
                        continue  # compose's; Kubernetes gives cert and key per pod by flags
                    volume, inside = _tree_mount(container, volumes, path, pod)
                    assert volume["readOnly"], path
                    source = volume.get("secret") or volume.get("configMap")
                    if source is None:
                        assert _object("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                        continue
                    source_name = source.get("secretName") or source["name"]
                    if "items" in source:
                        assert str(inside) in {i["path"] for i in source["items"]}, path
                        assert {i["key"] for i in source["items"]} <= created[source_name], source_name
                    else:  # the whole secret: the key is the file's name in it
                        assert str(inside) in created[source_name], (pod, path, source_name)
        state_dir = P(tomllib.loads(_tree_text(kind, False))["state_dir"])
        [mount] = [m for m in container["volumeMounts"] if P(m["mountPath"]) == state_dir]
        assert mount["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        assert sts["spec"]["replicas"] >= 1 and _object("Service", sts["spec"]["serviceName"])


def test_the_trees_services_reach_each_aggregator_and_the_intermediates_reach_the_root() -> None:
    root_sts, root = _statefulset("gdfed-root")
    inter_sts, inter = _statefulset("gdfed-intermediate")
    for kind, sts, container in (("root", root_sts, root), ("intermediate", inter_sts, inter)):
        settings = tomllib.loads(_tree_text(kind, False))
        grpc_port, metrics_port = _port(settings["listen"]), _port(settings["metrics_listen"])
        assert settings["listen"].startswith("0.0.0.0:") and settings["metrics_listen"].startswith("0.0.0.0:")
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named == {"grpc": grpc_port, "metrics": metrics_port}
        for probe in (container["readinessProbe"], container["livenessProbe"]):
            assert (probe.get("grpc") or probe["tcpSocket"])["port"] in (grpc_port, "grpc")
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_port)
    labels = inter_sts["spec"]["template"]["metadata"]["labels"]
    # A Service per intermediate pod, for its sites; the headless one names the pods.
    for pod in _pods("gdfed-intermediate"):
        selector = _object("Service", pod)["spec"]["selector"]
        assert selector == {
            **{k: labels[k] for k in selector if k in labels},
            "statefulset.kubernetes.io/pod-name": pod,
        }
    assert _object("Service", inter_sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # The intermediates' upstream is the root's Service, on its gRPC port.
    root_service = _object("Service", "gdfed-root")
    assert (
        root_service["spec"]["selector"].items() <= root_sts["spec"]["template"]["metadata"]["labels"].items()
    )
    host, _, port = tomllib.loads(_tree_text("intermediate", False))["upstream"]["address"].rpartition(":")
    [grpc] = [p for p in root_service["spec"]["ports"] if p["name"] == "grpc"]
    assert host == root_service["metadata"]["name"] and int(port) == grpc["port"]
    assert _port(tomllib.loads(_tree_text("root", False))["listen"]) == grpc["port"]


def test_compose_runs_a_root_two_intermediates_and_their_sites() -> None:
    compose = yaml.safe_load(TREE_COMPOSE.read_text())
    services, header = compose["services"], _header(TREE_COMPOSE)
    aggregators = {n: s for n, s in services.items() if s["command"][0] == "serve"}
    sites = {n: s for n, s in services.items() if s["command"][0] == "work"}
    assert set(services) == set(aggregators) | set(sites) and len(aggregators) == 3 and sites
    published: list[str] = []
    for name, service in aggregators.items():
        kind = "root" if name == "gdfed-root" else "intermediate"
        config_file, overrides = _serve(service["command"])
        settings = tomllib.loads(_tree_text(kind, True))
        binds = _compose_binds(service, compose)
        for path in [config_file, *_tree_reads(settings)]:
            [(target, source)] = [(t, s) for t, s in binds.items() if t == path or t in path.parents]
            on_host = (source / path.relative_to(target)).relative_to(ROOT)
            assert (
                f"{on_host}" in header
                or f"{on_host.parent}/" in header
                or f"{on_host.parent.parent}/" in header
            ), on_host
        if kind == "intermediate":
            host, _, port = settings["upstream"]["address"].rpartition(":")
            assert host == "gdfed-root" and int(port) == _port(
                tomllib.loads(_tree_text("root", False))["listen"]
            )
            assert overrides["upstream.site_id"] == name and "gdfed-root" in service["depends_on"]
        assert service["build"]["context"] == ".." and (ROOT / service["build"]["dockerfile"]).is_file()
        published += service["ports"]
    host_ports = [p.rsplit(":", 1)[0] for p in published]
    assert len(set(host_ports)) == len(host_ports) and all(p.startswith("127.0.0.1:") for p in published)
    # Each site: a worker command the CLI takes, at an intermediate whose token list the header gives it.
    for name, service in sites.items():
        parsed = build_parser("work").parse_args(service["command"])
        host, _, port = parsed.aggregator.rpartition(":")
        assert host in aggregators and host != "gdfed-root" and int(port) == 50051
        assert host in service["depends_on"]
        lines = [line for line in header.splitlines() if f"conf/tree/{host}/secrets/sites.tokens" in line]
        assert any(parsed.site in line for line in lines), (name, host)
        binds = _compose_binds(service, compose)
        for path in (P(parsed.token_file), P(str(parsed.model)), P(str(parsed.data))):
            [(target, source)] = [(t, s) for t, s in binds.items() if t == path or t in path.parents]
            assert (source / path.relative_to(target)).relative_to(ROOT).parts[0] in ("conf", "demo")
        assert "gdfed demo init demo" in header


def _compose_binds(service: dict[str, Any], compose: dict[str, Any]) -> dict[P, Path]:
    """container path -> host path of a service's bind mounts; named volumes must be declared."""
    binds = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):  # Compose resolves it against the compose file's directory
            binds[P(target)] = (DEPLOY / source).resolve()
        else:
            assert source in compose["volumes"] and not volume.endswith(":ro"), volume
    return binds


@pytest.mark.slow
def test_an_intermediate_on_the_example_config_joins_a_root_on_its_example_config(tmp_path: Path) -> None:
    root_port, inter_port = free_port(), free_port()
    daemons = []
    try:
        for kind, port in (("root", root_port), ("intermediate", inter_port)):
            text = _rerooted(_tree_text(kind, False), tmp_path / kind)
            text = re.sub(r'^listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', text, flags=re.MULTILINE)
            text = re.sub(r'^metrics_listen = "[^"]*"', 'metrics_listen = ""', text, flags=re.MULTILINE)
            text = text.replace('address = "gdfed-root:50051"', f'address = "127.0.0.1:{root_port}"')
            settings = tomllib.loads(text)
            for path in _tree_reads(settings):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(settings["admin_token_file"]).write_text("a-token\n")
            if kind == "root":
                write_state(Path(settings["init_state"]), small_state())
                tokens = "".join(f"{i} = token-{i}\n" for i in settings["tree"]["intermediates"])
                Path(settings["site_tokens_file"]).write_text(tokens)
            else:
                site_id = settings["upstream"]["site_id"]
                Path(settings["upstream"]["token_file"]).write_text(f"token-{site_id}\n")
                Path(settings["site_tokens_file"]).write_text("site-a = token-a\n")
            (tmp_path / f"{kind}.toml").write_text(text)
            daemon = Daemon(tmp_path / f"{kind}.toml", tmp_path / f"{kind}.log")
            daemons.append(daemon)
            daemon.start(f"127.0.0.1:{port}")
        with AdminClient(f"127.0.0.1:{root_port}", "a-token") as admin:
            joined = wait_for(
                lambda: [i.site_id for i in admin.status().intermediates if i.joined],
                60,
                0.2,
                "the intermediate to join",
            )
        assert joined == [site_id]
        for daemon in reversed(daemons):
            assert daemon.terminate(timeout=30) == 0, daemon.log()
    finally:
        for daemon in daemons:
            daemon.cleanup()
