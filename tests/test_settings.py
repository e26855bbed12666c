"""Settings that could not keep the guarantees are refused at startup, saying why."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from app.config import Settings
from app.main import EXIT_CONFIG
from tests.support import ROOT, free_port


def test_the_defaults_renew_three_times_a_lease_and_sweep_every_two_seconds() -> None:
    settings = Settings()
    assert settings.job_lease_seconds == 30
    assert settings.heartbeat_interval == 10
    assert settings.sweep_interval == 2
    assert settings.job_timeout_seconds == 600


def test_a_short_lease_sweeps_twice_per_lease() -> None:
    assert Settings(job_lease_seconds=2).sweep_interval == 1


def test_a_heartbeat_that_would_renew_less_than_twice_per_lease_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"HEARTBEAT_INTERVAL_SECONDS \(5\) must be below"):
        Settings(job_lease_seconds=10, heartbeat_interval_seconds=5)
    assert Settings(job_lease_seconds=10, heartbeat_interval_seconds=4.9).heartbeat_interval == 4.9


def test_a_lease_shorter_than_a_second_is_refused() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Settings(job_lease_seconds=0.5)


def test_a_sweep_interval_longer_than_the_lease_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"SWEEP_INTERVAL_SECONDS \(31\) must be at most"):
        Settings(sweep_interval_seconds=31)


@pytest.mark.parametrize("name", ["debug", "INFO", "Warning"])
def test_known_log_levels_are_accepted_in_any_case(name: str) -> None:
    assert Settings(log_level=name).log_level == name.upper()


def test_an_unknown_log_level_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="LOG_LEVEL 'LOUD' is not one of DEBUG, INFO"):
        Settings(log_level="LOUD")


def refused_start(**settings: str) -> list[str]:
    """Start a real server with these settings; return its "invalid settings" lines."""
    env = {"PATH": "/usr/bin:/bin", **settings}
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=60)
    log = run.stderr.decode()
    assert run.returncode == EXIT_CONFIG, log
    assert "Traceback" not in log
    return [line for line in log.splitlines() if line.startswith("invalid settings:")]


def test_a_server_with_invalid_settings_exits_78_with_one_line_per_setting() -> None:
    assert refused_start(JOB_TIMEOUT_SECONDS="0", LOG_LEVEL="loud") == [
        "invalid settings: JOB_TIMEOUT_SECONDS: Input should be greater than 0",
        "invalid settings: LOG_LEVEL 'loud' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    ]


def test_a_server_with_timings_that_do_not_fit_together_exits_78_saying_why() -> None:
    [line] = refused_start(JOB_LEASE_SECONDS="4", HEARTBEAT_INTERVAL_SECONDS="3")
    assert line.startswith(
        "invalid settings: HEARTBEAT_INTERVAL_SECONDS (3) must be below half of "
        "JOB_LEASE_SECONDS (4)"
    )


def test_a_sqlite_url_with_options_is_refused_when_settings_are_read() -> None:
    with pytest.raises(ValidationError, match=r"without \?options"):
        Settings(database_url="sqlite:///jobs.db?mode=ro")


def test_api_keys_come_from_the_variable_and_the_file_together(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("from-file-1\n\n  from-file-2  \nshared\n")
    settings = Settings(api_keys=SecretStr("k-one, k-two,shared"), api_keys_file=keys)
    assert settings.read_api_keys() == ("k-one", "k-two", "shared", "from-file-1", "from-file-2")
    assert "k-one" not in repr(settings)
    assert Settings().read_api_keys() == ()


def test_a_server_with_an_unreadable_api_keys_file_exits_78_rather_than_run_open(
    tmp_path: Path,
) -> None:
    [line] = refused_start(API_KEYS_FILE=str(tmp_path / "missing"))
    assert line.startswith("invalid settings: API_KEYS_FILE cannot be read")


def test_api_keys_that_hold_no_key_are_refused() -> None:
    with pytest.raises(ValidationError, match="hold no key"):
        Settings(api_keys=SecretStr(" , "))


def test_expired_jobs_are_looked_for_a_quarter_retention_apart_within_bounds() -> None:
    assert Settings().purge_interval == 30
    assert Settings(job_retention_seconds=60).purge_interval == 15
    assert Settings(job_retention_seconds=1).purge_interval == 0.5


@pytest.mark.parametrize("key", ["clé", "two words", "tab\tkey"])
def test_api_keys_a_client_could_not_send_the_same_everywhere_are_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings(api_keys=SecretStr(f"good-key,{key}"))


def test_the_readme_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Settings") : readme.index("## Performance")]
    rows = {
        row.split("|")[1].strip().strip("`"): row.split("|")[2].strip()
        for row in table.splitlines()
        if row.startswith("| `")
    }
    for name, field in Settings.model_fields.items():
        assert name.upper() in rows, f"{name.upper()} is not in the README's settings table"
        default = field.default
        if isinstance(default, bool):
            assert rows[name.upper()] == f"`{str(default).lower()}`", name
        elif isinstance(default, int | float):
            shown = str(int(default)) if default == int(default) else str(default)
            assert rows[name.upper()].startswith(f"`{shown}`"), name
