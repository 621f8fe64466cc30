"""Consortium credentials, node profiles and the deployed client's budget: fast checks, no processes."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.x509.verification import PolicyBuilder, Store
from flwr.app import Context, RecordDict

from fedllm.certs import ConsortiumPaths
from fedllm.cli import main
from fedllm.config import config_hash, load_config, to_toml
from fedllm.data.federation import load_federated
from fedllm.deploy import deployment_config, parse_address
from fedllm.errors import ConfigError
from fedllm.profile import load_profile
from fedllm.run.spec import spec_from_run_config
from fedllm.signing import public_openssh, same_key

LABELS = ("finance", "health", "sports", "weather")


@pytest.fixture
def consortium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[ConsortiumPaths, str]:
    """Made through the command line, under umask 0: modes must come from creation, not from the umask."""
    old = os.umask(0)
    try:
        rc = main(
            [
                *("certs", str(tmp_path / "c"), "--san", "localhost", "--san", "127.0.0.1", "--san", "::1"),
                *("--node", "st-marys", "--node", "city-general"),
            ]
        )
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return ConsortiumPaths(tmp_path / "c"), captured.out + captured.err


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_names_every_san_and_chains_to_the_ca(consortium):
    paths, _ = consortium
    ca, server = _cert(paths.ca_cert), _cert(paths.server_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    store = Store([ca])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(Exception, match=r"(?i)name|san|match"):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example")).verify(server, [])


def test_private_keys_are_0600_public_files_0644_and_keys_never_printed(consortium):
    paths, output = consortium
    secrets = [paths.ca_key, paths.server_key, paths.node_key("st-marys"), paths.node_key("city-general")]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        body = [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
        assert not any(line in output for line in body), f"{path} leaked into the output"
    for path in (paths.ca_cert, paths.server_cert, paths.node_key("st-marys").with_name("node_key.pub")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert "PRIVATE KEY" not in output
    assert isinstance(load_pem_private_key(paths.server_key.read_bytes(), None), ec.EllipticCurvePrivateKey)
    node = load_ssh_private_key(paths.node_key("st-marys").read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert same_key(paths.node_key("st-marys").with_name("node_key.pub").read_text(), public_openssh(node))


def test_existing_keys_are_never_overwritten_without_force(consortium, capsys):
    paths, _ = consortium
    before = paths.node_key("st-marys").read_bytes()
    assert main(["certs", str(paths.root), "--node", "st-marys", "--node", "new-member"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedllm: error: ") and str(paths.node_key("st-marys")) in err and "--force" in err
    assert paths.node_key("st-marys").read_bytes() == before
    assert not paths.node_key("new-member").exists(), "a refused command writes nothing"
    ca_before = paths.ca_key.read_bytes()
    assert main(["certs", str(paths.root), "--san", "localhost"]) == 2
    assert paths.ca_key.read_bytes() == ca_before
    assert main(["certs", str(paths.root), "--node", "st-marys", "--force"]) == 0
    assert paths.node_key("st-marys").read_bytes() != before
    assert stat.S_IMODE(paths.node_key("st-marys").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--san", "not a host"], "--san"),
        (["--node", "../escape"], "--node"),
        (["--node", "a", "--node", "a"], "--node"),
        ([], "nothing to make"),
        (["--san", "localhost", "--days", "0"], "--days"),
    ],
)
def test_bad_certs_flags_fail_in_one_line(tmp_path, capsys, argv, needle):
    assert main(["certs", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedllm: error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_parse_address_names_the_flag():
    assert parse_address("10.0.0.1:9092", "--address") == ("10.0.0.1", 9092)
    assert parse_address("[::1]:9092", "--address") == ("::1", 9092)
    with pytest.raises(ConfigError, match="--superlink"):
        parse_address("localhost", "--superlink")


# ---------------------------------------------------------------------------------------------- profiles


def _write_profile(root: Path, consortium: ConsortiumPaths, *, epsilon: object = 3.0, extra: str = "") -> Path:
    data = root / "h.csv"
    rows = [f"note {i} about {LABELS[i % 4]},{LABELS[i % 4]}" for i in range(40)]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    path = root / "profiles" / "st-marys.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""[institution]
id = "st-marys"
[data]
path = "../h.csv"
declared_examples = 36
[privacy]
epsilon = {epsilon}
delta = 1e-5
planned_rounds = 2
[training]
local_steps = 2
batch_size = 8
[node]
key = "{consortium.node_key("st-marys")}"
ca = "${{FEDLLM_TEST_CA}}"
state_dir = "../state/st-marys"
{extra}"""
    )
    return path


def test_profile_paths_resolve_relative_to_the_file_and_from_env(tmp_path, consortium, monkeypatch):
    paths, _ = consortium
    monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    profile = load_profile(_write_profile(tmp_path, paths))
    assert profile.id == "st-marys" and profile.epsilon == 3.0 and profile.settings.planned_rounds == 2
    assert profile.data == (tmp_path / "h.csv").resolve()
    assert profile.ca == paths.ca_cert.resolve()
    assert profile.state_dir == (tmp_path / "state" / "st-marys").resolve()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epsilon": -1}, "privacy.epsilon"),
        ({"epsilon": '"eight"'}, "privacy.epsilon"),
        ({"extra": "[privacy2]\n"}, "privacy2"),
        ({"extra": "superlink = 5\n"}, "node.superlink"),
        ({"env": False}, "node.ca"),
    ],
)
def test_bad_profile_field_is_named_with_its_file(tmp_path, consortium, monkeypatch, change, field):
    paths, _ = consortium
    if change.pop("env", True):
        monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    else:
        monkeypatch.delenv("FEDLLM_TEST_CA", raising=False)
    path = _write_profile(tmp_path, paths, **change)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_profile_missing_field_and_missing_data_file(tmp_path, consortium, monkeypatch):
    paths, _ = consortium
    monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    path = _write_profile(tmp_path, paths)
    path.write_text(path.read_text().replace('id = "st-marys"\n', ""))
    with pytest.raises(ConfigError, match=r"st-marys\.toml: institution\.id: required"):
        load_profile(path)
    path = _write_profile(tmp_path, paths)
    (tmp_path / "h.csv").unlink()
    with pytest.raises(ConfigError, match=r"st-marys\.toml: data\.path: no such file"):
        load_profile(path)


# ---------------------------------------------------------------------------------------------- deployed run


def _deployed_scenario(tmp_path: Path, central: bool) -> Path:
    central_line = ""
    if central:
        (tmp_path / "central.csv").write_text("text,label\n" + "".join(f"about {x},{x}\n" for x in LABELS))
        central_line = f'central_test = "{tmp_path / "central.csv"}"\n'
    path = tmp_path / "deploy.toml"
    path.write_text(
        f"""name = "deployed"
rounds = 2
num_clients = 2
[model]
name = "tiny-bert"
max_length = 16
[data]
source = "nodes"
labels = {list(LABELS)!r}
{central_line}[training]
local_steps = 2
batch_size = 8
[privacy]
epsilon = 8.0
[[clients]]
id = "st-marys"
declared_examples = 36
[[clients]]
id = "city-general"
"""
    )
    return path


@pytest.mark.parametrize("central", [True, False])
def test_coordinator_needs_only_labels_and_optionally_its_test_file(tmp_path, central):
    cfg = deployment_config(str(_deployed_scenario(tmp_path, central)))
    fed = load_federated(cfg.data, cfg.client_ids, cfg.seed)
    assert fed.label_names == LABELS and fed.clients == ()
    assert len(fed.central_test) == (4 if central else 0)


def test_deployed_run_refuses_client_held_sources_and_open_label_spaces(tmp_path):
    path = _deployed_scenario(tmp_path, central=False)
    path.write_text(path.read_text().replace('source = "nodes"', 'source = "synthetic"'))
    with pytest.raises(ConfigError, match=r"deploy\.toml: data\.source"):
        deployment_config(str(path))
    path = _deployed_scenario(tmp_path, central=False)
    path.write_text(path.read_text().replace("labels = ", "# labels = "))
    with pytest.raises(ConfigError, match=r"data\.labels"):
        deployment_config(str(path))


def _context(profile: Path, cfg_toml: str, tmp_path: Path) -> Context:
    return Context(
        run_id=7,
        node_id=1,
        node_config={"profile": str(profile)},
        state=RecordDict(),
        run_config={"config-toml": cfg_toml, "out-dir": str(tmp_path / "run"), "scenario": "", "config-file": ""},
    )


def test_inline_config_rebuilds_the_same_config_on_every_side(tmp_path):
    cfg, _ = load_config(str(_deployed_scenario(tmp_path, central=False)))
    spec = spec_from_run_config({"config-toml": to_toml(cfg), "out-dir": str(tmp_path / "run")})
    assert spec.config == cfg and config_hash(spec.config) == config_hash(cfg)


def test_run_config_cannot_raise_the_budget_a_profile_sets(tmp_path, consortium, monkeypatch):
    """The coordinator submits epsilon 100 for st-marys; its profile says 3: the node refuses the run outright.

    A run that agrees with the profile is served, with the profile's budget, state dir and key."""
    from fedllm.client import client_for

    paths, _ = consortium
    monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    profile = _write_profile(tmp_path, paths, epsilon=3.0)
    scenario = _deployed_scenario(tmp_path, central=False)
    greedy, _ = load_config(str(scenario), {"privacy.epsilon": 100.0, "privacy.delta": 1e-3})
    assert greedy.client_settings("st-marys").epsilon == 100.0
    ctx = _context(profile, to_toml(greedy), tmp_path)
    with pytest.raises(ConfigError, match=r"privacy\.epsilon = 100 \(this node: 3\); privacy\.delta = 0\.001"):
        client_for(spec_from_run_config(ctx.run_config), ctx)
    assert not (tmp_path / "state" / "st-marys" / "ledger.sqlite").exists(), "refused before any spend"
    honest, _ = load_config(
        str(scenario),
        {
            "clients": [
                {"id": "st-marys", "epsilon": 3.0, "declared_examples": 36},
                {"id": "city-general", "epsilon": 100.0},
            ]
        },
    )
    ctx = _context(profile, to_toml(honest), tmp_path)
    client = client_for(spec_from_run_config(ctx.run_config), ctx)
    assert client.client_id == "st-marys"
    assert (client.privacy.epsilon, client.privacy.delta, client.privacy.planned_rounds) == (3.0, 1e-5, 2)
    assert client.state_dir == (tmp_path / "state" / "st-marys").resolve()
    assert client.signing_key == paths.node_key("st-marys")
    assert client.config.client_settings("city-general").epsilon == 100.0, "another member's entry is its own"
    assert len(client.assets.train) + len(client.assets.test) == 40
    # The mechanism it plans spends its own budget over its planned rounds, not the coordinator's.
    from fedllm.accounting import epsilon_of_mechanisms

    mechanism = client._mechanism()
    spent = epsilon_of_mechanisms(client.privacy.accountant, [mechanism] * 2, client.privacy.delta)
    assert spent <= 3.0 + 1e-6


def test_a_profile_requires_secure_aggregation_whatever_the_run_config_says(tmp_path, consortium, monkeypatch):
    """The submitted run turns SecAgg+ off; the node's profile (default: required) keeps it on."""
    from fedllm.apps.client import node_settings

    paths, _ = consortium
    monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    profile = _write_profile(tmp_path, paths)
    scenario = _deployed_scenario(tmp_path, central=False)
    unmasked, _ = load_config(str(scenario), {"secure_aggregation.enabled": False})
    ctx = _context(profile, to_toml(unmasked), tmp_path)
    assert load_profile(profile).require_secure_aggregation is True
    assert node_settings(ctx).require_secure_aggregation is True
    relaxed = (
        _write_profile(tmp_path, paths, extra="")
        .read_text()
        .replace("planned_rounds = 2\n", "planned_rounds = 2\nrequire_secure_aggregation = false\n")
    )
    profile.write_text(relaxed)
    assert node_settings(ctx).require_secure_aggregation is False  # only the institution itself can relax it
    profile.write_text(relaxed.replace("= false", '= "no"'))
    with pytest.raises(ConfigError, match=r"privacy\.require_secure_aggregation: expected bool"):
        load_profile(profile)


def test_profile_agreeing_with_the_run_keeps_its_config_hash(tmp_path, consortium, monkeypatch):
    from fedllm.client import client_for

    paths, _ = consortium
    monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    profile = _write_profile(tmp_path, paths, epsilon=8.0)
    cfg, _ = load_config(str(_deployed_scenario(tmp_path, central=False)))
    ctx = _context(profile, to_toml(cfg), tmp_path)
    spec = spec_from_run_config(ctx.run_config)
    client = client_for(spec, ctx)
    assert client.config_hash == config_hash(spec.config)


def test_profile_of_a_non_member_is_refused(tmp_path, consortium, monkeypatch):
    from fedllm.client import client_for

    paths, _ = consortium
    monkeypatch.setenv("FEDLLM_TEST_CA", str(paths.ca_cert))
    profile = _write_profile(tmp_path, paths)
    profile.write_text(profile.read_text().replace('id = "st-marys"', 'id = "outsider"'))
    cfg, _ = load_config(str(_deployed_scenario(tmp_path, central=False)))
    ctx = _context(profile, to_toml(cfg), tmp_path)
    with pytest.raises(ConfigError, match=r"institution\.id: 'outsider' is not among"):
        client_for(spec_from_run_config(ctx.run_config), ctx)


@pytest.mark.parametrize(
    ("scenario", "members"),
    [
        ("hospitals", ("st-marys", "city-general", "northside-clinic")),
        ("banks", ("harbour-bank", "union-savings", "metro-credit")),
    ],
)
def test_example_profiles_match_their_deployment(tmp_path, monkeypatch, scenario, members):
    """The shipped profiles validate once `fedllm certs consortium` ran, read their data and agree with the run."""
    import shutil

    from fedllm.paths import PROJECT_ROOT, shared_data_dir, shared_dir

    if not shared_data_dir().is_dir():
        pytest.skip(f"shared data not found at {shared_data_dir()} (set FEDLLM_SHARED)")
    monkeypatch.setenv("FEDLLM_SHARED", str(shared_dir()))  # the profiles name it; plain pytest uses the default
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    profiles = tmp_path / "clients" / "profiles"
    shutil.copytree(PROJECT_ROOT / "clients" / "profiles", profiles)
    assert main(["certs", str(tmp_path / "consortium"), *(a for m in members for a in ("--node", m))]) == 0
    (tmp_path / "consortium" / "ca.crt").write_text("placeholder: only its presence is checked here\n")
    cfg = deployment_config(str(PROJECT_ROOT / "deployments" / f"{scenario}.toml"))
    assert tuple(cfg.client_ids) == members
    for member in members:
        profile = load_profile(profiles / f"{member}.toml")
        assert profile.id == member and profile.state_dir == (tmp_path / "home" / ".fedllm" / member).resolve()
        profile.check_run(cfg)  # profile and deployment agree on every privacy setting, or this raises
    split = profile.load_split(cfg)
    assert len(split.train) > 1000 and set(split.train.labels) <= set(range(len(cfg.data.labels)))


def test_simulate_refuses_a_deployment_scenario(tmp_path, capsys):
    assert main(["simulate", str(_deployed_scenario(tmp_path, central=False)), "--quiet"]) == 2
    assert "data.source: 'nodes' is for a deployed run" in capsys.readouterr().err


def test_insecure_server_refuses_node_keys(tmp_path, consortium, capsys):
    paths, _ = consortium
    pub = f"{paths.node_key('st-marys')}.pub"
    argv = ["server", "--certs", str(paths.root), "--address", "127.0.0.1:1", "--insecure", "--node-key", pub]
    assert main(argv) == 2
    assert "--node-key: node authentication needs TLS" in capsys.readouterr().err
