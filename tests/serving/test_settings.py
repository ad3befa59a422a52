"""Service settings: flags > PEP_SERVE_<FIELD> variables > defaults, built by the config machinery;
every bad value is a ConfigError naming the flag or the variable (one `error:` line, exit 2)."""

from __future__ import annotations

import os

import pytest

from pep_torchrec import cli
from pep_torchrec.config import ConfigError
from pep_torchrec.serving.app import Settings
from pep_torchrec.utils.errors import USER_ERROR_EXIT


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No PEP_SERVE_* variable of the shell running the tests leaks in."""
    for var in [v for v in os.environ if v.startswith("PEP_SERVE_")]:
        monkeypatch.delenv(var)


def test_flags_beat_environment_beats_defaults(monkeypatch):
    monkeypatch.setenv("PEP_SERVE_PORT", "8081")
    monkeypatch.setenv("PEP_SERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("PEP_SERVE_WARMUP", "false")
    monkeypatch.setenv("PEP_SERVE_ADMIN_TOKEN", "0123")  # a string field takes the text verbatim
    settings = Settings.from_env(artifact="a", port=9000, host=None)  # None: flag not given
    assert settings == Settings(artifact="a", host="0.0.0.0", port=9000, warmup=False, admin_token="0123")
    assert Settings.from_env(artifact="a").port == 8081
    assert Settings.from_env(artifact="a").max_instances == Settings(artifact="a").max_instances
    monkeypatch.setenv("PEP_SERVE_ARTIFACT", "from-env")
    assert Settings.from_env().artifact == "from-env"
    assert Settings.from_env(artifact="from-flag").artifact == "from-flag"


@pytest.mark.parametrize(("raw", "warmup"), [("1", True), ("0", False), ("yes", True), ("off", False)])
def test_bool_variables_take_yaml_and_the_shell_idiom(monkeypatch, raw, warmup):
    monkeypatch.setenv("PEP_SERVE_WARMUP", raw)
    assert Settings.from_env(artifact="a").warmup is warmup


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("PEP_SERVE_WARMUP", "maybe", "PEP_SERVE_WARMUP='maybe': expected true/false"),  # was: False
        ("PEP_SERVE_MAX_BODY_BYTES", "[1", r"PEP_SERVE_MAX_BODY_BYTES='\[1': cannot parse"),
        ("PEP_SERVE_PORT", "80.5", "PEP_SERVE_PORT='80.5': expected an integer"),
        ("PEP_SERVE_NUM_THREADS", "0", r"--num-threads \(PEP_SERVE_NUM_THREADS\): must be at least 1"),
        ("PEP_SERVE_PROT", "8081", "unknown variable PEP_SERVE_PROT .known: PEP_SERVE_ADMIN_TOKEN, "),
    ],
)
def test_bad_variables_are_config_errors_naming_them(monkeypatch, var, raw, message):
    monkeypatch.setenv(var, raw)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(artifact="a")


def test_bad_settings_are_config_errors():
    """A UserError (cli.run_command's one catch), not a bare ValueError."""
    with pytest.raises(ConfigError, match=r"--port \(PEP_SERVE_PORT\): 70000 is not a TCP port"):
        Settings(artifact="a", port=70000)
    with pytest.raises(ConfigError, match="no artifact: pass --artifact or set PEP_SERVE_ARTIFACT"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PEP_SERVE_WARMUP": "maybe"}, "error: PEP_SERVE_WARMUP='maybe': expected true/false"),
        ({"PEP_SERVE_PROT": "1"}, "error: unknown variable PEP_SERVE_PROT"),
        ({"PEP_SERVE_PORT": "0"}, "error: --port (PEP_SERVE_PORT): must be at least 1, got 0"),
    ],
)
def test_serve_refuses_bad_variables_with_one_line(tmp_path, capsys, monkeypatch, env, message):
    """Refused before the artifact is read (it does not even exist), exit 2."""
    for var, raw in env.items():
        monkeypatch.setenv(var, raw)
    assert cli.main(["serve", "--artifact", str(tmp_path / "none")]) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
